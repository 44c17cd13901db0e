"""A pgsql:/mysql:/sqlite: configuration file, read as Postfix's cfg_parser reads it.

The file has main.cf syntax (``name = value``, ``#`` comments, continuation
lines starting with whitespace; a later definition overrides an earlier one,
with a warning). Values are not ``$``-expanded. Where Postfix stops with a
fatal error (bad number, bad boolean, a required value missing) the open fails
with the same words. Unknown names are ignored, as Postfix ignores them, so an
operator's existing files work unchanged.

Postfix also accepts a table name that is not a path (``pgsql:name``) and then
reads ``name_hosts``, ``name_query``, ... from main.cf; that form is obsolete
(pgsql_table(5): "will be removed") and is refused here with a clear message.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TypeVar

from ...config.maincf import decode, logical_lines, split_nameval
from ..base import TableConfigError
from ..source import CHARS_COMMA_SP, Identity, file_identity, read_fd

_STRTOL = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_B = TypeVar("_B", bool, None)


class CfgFile:
    """The parameters of one .cf file; ``get_*`` are Postfix's cfg_get_str/int/bool."""

    def __init__(self, path: str, log: logging.Logger) -> None:
        if not path.startswith(("/", ".")):
            raise TableConfigError(
                f"{path}: parameters in main.cf (a table name that is not a path) are not "
                "supported: put them in a file and name its path"
            )
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
            data, st = read_fd(fd)
        except OSError as e:
            raise TableConfigError(f"open {path}: {e.strerror}") from e
        self._identity: Identity = file_identity(st)
        self._params: dict[str, str] = {}
        for lineno, line in logical_lines(decode(data), path, log):
            try:
                name, value = split_nameval(line)
            except ValueError as e:
                raise TableConfigError(f'{path}, line {lineno}: {e}: "{line}"') from None
            old = self._params.get(name)
            if old is not None and old != value:
                shown = "***" if name == "password" else old  # Postfix would log it
                log.warning(
                    "%s, line %d: overriding earlier entry: %s=%s", path, lineno, name, shown
                )
            self._params[name] = value

    def changed(self) -> bool:
        """True when the file was replaced or rewritten since it was read."""
        try:
            return file_identity(os.stat(self.path)) != self._identity
        except OSError:
            return True

    def get_str(self, name: str, default: str = "", min: int = 0, max: int = 0) -> str:
        value = self._params.get(name, default)
        if min and len(value) < min:
            raise TableConfigError(
                f"{self.path}: bad string length {len(value)} < {min}: {name} = {value}"
            )
        if max and len(value) > max:
            raise TableConfigError(
                f"{self.path}: bad string length {len(value)} > {max}: {name} = {value}"
            )
        return value

    def get_optional(self, name: str) -> str | None:
        """cfg_get_str() without a default: an absent or empty value is None."""
        return self._params.get(name) or None

    def get_int(self, name: str, default: int, min: int = 0, max: int = 0) -> int:
        text = self._params.get(name)
        value = default
        if text is not None:
            if not _STRTOL.fullmatch(text) or not _INT_MIN <= int(text) <= _INT_MAX:
                raise TableConfigError(f"{self.path}: bad numerical configuration: {name} = {text}")
            value = int(text)
        if min and value < min:
            raise TableConfigError(f"{self.path}: invalid {name} parameter value {value} < {min}")
        if max and value > max:
            raise TableConfigError(f"{self.path}: invalid {name} parameter value {value} > {max}")
        return value

    def get_bool(self, name: str, default: _B) -> bool | _B:
        """cfg_get_bool(); ``default`` may be None for "not set"."""
        text = self._params.get(name)
        if text is None:
            return default
        if text.lower() in ("yes", "no"):
            return text.lower() == "yes"
        raise TableConfigError(f"{self.path}: bad boolean configuration: {name} = {text}")


@dataclass(frozen=True, slots=True)
class LookupConfig:
    """What every SQL table's lookups need, whatever the database."""

    query: str
    result_format: str
    expansion_limit: int
    domain: str


def lookup_config(cfg: CfgFile, query: str | None = None) -> LookupConfig:
    """The common parameters; ``query`` when the driver built it another way (pgsql's
    ``select_function``), else the ``query`` parameter or the legacy parts."""
    return LookupConfig(
        query=query or cfg.get_optional("query") or legacy_query(cfg),
        result_format=cfg.get_str("result_format", "%s", min=1),
        # Postfix: "the default should be non-zero for safety, but that is not
        # backwards compatible".
        expansion_limit=cfg.get_int("expansion_limit", 0),
        domain=cfg.get_str("domain"),
    )


def legacy_query(cfg: CfgFile) -> str:
    """The query Postfix builds from ``table``, ``select_field``, ``where_field`` and
    ``additional_conditions`` when ``query`` is not set (db_common_sql_build_query)."""
    table = cfg.get_str("table", min=1)
    select_field = cfg.get_str("select_field", min=1)
    where_field = cfg.get_str("where_field", min=1)
    conditions = cfg.get_str("additional_conditions")
    return f"SELECT {select_field} FROM {table} WHERE {where_field}='%s' {conditions}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How to reach a database server (pgsql, mysql), and Postfix's failover timers."""

    hosts: tuple[str, ...]
    user: str
    password: str = field(repr=False)
    dbname: str
    retry_interval: int  # seconds a host is skipped after an error
    idle_interval: int  # seconds an unused connection stays open


def server_config(cfg: CfgFile, dbname_min: int) -> ServerConfig:
    return ServerConfig(
        hosts=tuple(host_list(cfg)),
        user=cfg.get_str("user"),
        password=cfg.get_str("password"),
        dbname=cfg.get_str("dbname", min=dbname_min),
        retry_interval=cfg.get_int("retry_interval", 60, min=1),
        idle_interval=cfg.get_int("idle_interval", 60, min=1),
    )


def host_list(cfg: CfgFile) -> list[str]:
    """``hosts`` as Postfix lists them: "localhost" when empty, and a single host twice.

    Postfix takes a single host for a load balancer and lists it twice so that
    one failure is followed by an immediate reconnect, not by ``retry_interval``
    seconds of errors.
    """
    hosts = [h for h in re.split(f"[{re.escape(CHARS_COMMA_SP)}]", cfg.get_str("hosts")) if h]
    if not hosts:
        hosts = ["localhost"]
    if len(hosts) == 1:
        hosts.append(hosts[0])
    return hosts
