"""Table type name -> driver class, built-in types first, then plugins.

A third-party table type is a Python package that declares an entry point in
the ``pyproxymap.tables`` group: ``mytype = mypackage.module:MyTable``, where
``MyTable`` subclasses :class:`pyproxymap.tables.base.Table`. Built-in names
cannot be overridden by a plugin.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from importlib.metadata import entry_points

from .base import Table

log = logging.getLogger("pyproxymap")

#: Built-in types: name -> "module:Class", imported on first use so that a
#: deployment does not pay for drivers (and their libraries) it never opens.
BUILTIN: dict[str, str] = {
    "texthash": "pyproxymap.tables.texthash:TexthashTable",
    "inline": "pyproxymap.tables.inline:InlineTable",
    "static": "pyproxymap.tables.static:StaticTable",
    "hash": "pyproxymap.tables.bdb:BerkeleyHashTable",
    "btree": "pyproxymap.tables.bdb:BerkeleyBtreeTable",
    "lmdb": "pyproxymap.tables.lmdb:LmdbTable",
    "cdb": "pyproxymap.tables.cdb:CdbTable",
    "cidr": "pyproxymap.tables.cidr:CidrTable",
    "regexp": "pyproxymap.tables.regexp:RegexpTable",
    "pcre": "pyproxymap.tables.pcre:PcreTable",
    "unix": "pyproxymap.tables.unix:UnixTable",
    "environ": "pyproxymap.tables.environ:EnvironTable",
    "fail": "pyproxymap.tables.fail:FailTable",
    "randmap": "pyproxymap.tables.randmap:RandmapTable",
    "unionmap": "pyproxymap.tables.unionmap:UnionmapTable",
    "pipemap": "pyproxymap.tables.pipemap:PipemapTable",
    "socketmap": "pyproxymap.tables.socketmap:SocketmapTable",
    "tcp": "pyproxymap.tables.tcp:TcpTable",
    "pgsql": "pyproxymap.tables.sql.pgsql:PgsqlTable",
    "mysql": "pyproxymap.tables.sql.mysql:MysqlTable",
    "sqlite": "pyproxymap.tables.sql.sqlite:SqliteTable",
    "ldap": "pyproxymap.tables.ldap:LdapTable",
    "memcache": "pyproxymap.tables.memcache:MemcacheTable",
}


def _load(target: str) -> type[Table]:
    module, _, attr = target.partition(":")
    driver = getattr(importlib.import_module(module), attr)
    if not (isinstance(driver, type) and issubclass(driver, Table)):
        raise TypeError(f"{target} is not a Table subclass")
    return driver


@cache
def _plugins() -> dict[str, str]:
    found = {}
    for ep in entry_points(group="pyproxymap.tables"):
        if ep.name in BUILTIN:
            log.warning("plugin table type %s ignored: it is a built-in type", ep.name)
            continue
        found[ep.name] = ep.value
    return found


@cache
def driver_for(type_name: str) -> type[Table] | None:
    """The driver class for a table type, or None when the type is unknown."""
    target = BUILTIN.get(type_name) or _plugins().get(type_name)
    return _load(target) if target else None


def known_types() -> list[str]:
    return sorted({*BUILTIN, *_plugins()})
