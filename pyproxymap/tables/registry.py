"""Table type name -> driver class, built-in types first, then plugins.

A third-party table type is a Python package that declares an entry point in
the ``pyproxymap.tables`` group: ``mytype = mypackage.module:MyTable``, where
``MyTable`` subclasses :class:`pyproxymap.tables.base.Table`. Built-in names
cannot be overridden by a plugin. As Postfix loads a dynamic map type only from a
file owned by root (or by itself) that no group or other user may write
(dynamicmaps.c), a plugin whose module files are owned or writable by other users is
refused: code that someone else can change never runs in a root-started server.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

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


def unsafe_file(module: str) -> str | None:
    """A file of ``module``'s top-level package (or module) that is owned by a user
    other than root or us, or writable by group or others; None when all are safe.
    Looked at before anything of it is imported."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
        return None  # the import will fail and say so
    files = [Path(spec.origin)] if spec.has_location and spec.origin else []
    for location in spec.submodule_search_locations or ():
        files += [Path(location), *Path(location).rglob("*")]
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return str(path)
    return None


@cache
def driver_for(type_name: str) -> type[Table] | None:
    """The driver class for a table type, or None when the type is unknown (or, for a
    plugin, refused as Postfix refuses a map library others can change)."""
    if type_name in BUILTIN:
        return _load(BUILTIN[type_name])
    target = _plugins().get(type_name)
    if target is None:
        return None
    if bad := unsafe_file(target.partition(":")[0]):
        log.warning(
            "unsupported dictionary type: %s (%s: file is owned or writable by other users)",
            type_name,
            bad,
        )
        return None
    return _load(target)


def known_types() -> list[str]:
    return sorted({*BUILTIN, *_plugins()})
