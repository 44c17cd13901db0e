"""pyproxymap's own settings: what Postfix's main.cf has no word for.

Every setting is defined once here (name, type, default, help); the command
line options, the optional TOML file (``pyproxymap.toml`` beside main.cf, or
``--config FILE``) and the README's table all come from this list.
Precedence: command line > TOML file > default.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from .tables.base import TableOptions
from .wire.attr import Limits


@dataclass(frozen=True, slots=True)
class TableSettings:
    """Per-table options: ``[table_defaults]`` and ``[tables."type:name"]`` in the TOML file."""

    defaults: TableOptions = field(default_factory=TableOptions)
    per_table: Mapping[str, TableOptions] = field(default_factory=dict)

    def options_for(self, spec: str) -> TableOptions:
        return self.per_table.get(spec, self.defaults)

    def shared_by(self, processes: int) -> TableSettings:
        """Each of ``processes`` workers' share of the bounds set for the whole service:
        ``max_connections`` and ``cache_size`` divided, rounded down, at least 1 (so
        with more workers than connections, each still holds one)."""

        def share(options: TableOptions) -> TableOptions:
            return replace(
                options,
                max_connections=max(1, options.max_connections // processes),
                cache_size=max(1, options.cache_size // processes) if options.cache_size else 0,
            )

        return TableSettings(
            share(self.defaults), {spec: share(o) for spec, o in self.per_table.items()}
        )

    @classmethod
    def from_toml(
        cls, defaults: dict[str, Any], tables: dict[str, Any], where: str
    ) -> TableSettings:
        base = _table_options(TableOptions(), defaults, f"{where} [table_defaults]")
        per_table = {
            spec: _table_options(base, values, f'{where} [tables."{spec}"]')
            for spec, values in tables.items()
        }
        return cls(base, per_table)


def _table_options(base: TableOptions, values: dict[str, Any], where: str) -> TableOptions:
    kinds = get_type_hints(TableOptions)
    out = {}
    for name, value in values.items():
        if name not in kinds:
            raise ValueError(f"{where}: unknown table option {name!r}")
        out[name] = kinds[name](value)
        if out[name] < 0:
            raise ValueError(f"{where}: {name} must not be negative")
    return replace(base, **out)


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    request_timeout: float = _setting(
        1.0,
        "Seconds a client has to send a whole request once it has begun, and to take a "
        "reply we could not write at once; past it the connection is closed (Postfix's "
        "proxymap uses the same 1 s deadline).",
    )
    max_name_length: int = _setting(64, "Longest attribute name accepted in a request.")
    max_value_length: int = _setting(
        262144,
        "Longest attribute value (key, value, table name) accepted in a request. Postfix's "
        "longest keys are header_checks lookups (header_size_limit = 102400).",
    )
    max_attributes: int = _setting(16, "Most attributes accepted in one request.")
    max_pipelined: int = _setting(
        128, "Requests read ahead on one connection before reading pauses for replies."
    )
    reload_check_interval: float = _setting(
        1.0,
        "Seconds between checks whether an open table's file changed; a changed table is "
        "reopened in the background and swapped in atomically.",
    )
    reopen_delay: float = _setting(1.0, "Seconds before a table that failed to open is retried.")
    shutdown_grace: float = _setting(
        10.0, "Seconds a stopping server lets in-flight requests finish before closing."
    )
    proxymap_socket: str = _setting(
        "",
        "Path of the read-only service socket "
        "(default: $queue_directory/private/$proxymap_service_name).",
    )
    proxywrite_socket: str = _setting(
        "",
        "Path of the read-write service socket "
        "(default: $queue_directory/private/$proxywrite_service_name).",
    )
    admin_socket: str = _setting(
        "",
        "Path of the admin socket that pyproxymap status, reload and flush use; only its "
        "owner may connect (default: $queue_directory/pyproxymap/admin, outside Postfix's "
        "private/ and public/).",
    )
    metrics_address: str = _setting(
        "",
        "host:port to serve Prometheus metrics on (/metrics), e.g. 127.0.0.1:9187; "
        "empty: off. Needs the metrics extra (prometheus_client).",
    )
    services: str = _setting(
        "proxymap,proxywrite", "Services to run, comma-separated: proxymap, proxywrite."
    )
    workers: int = _setting(
        0,
        "Worker processes sharing the proxymap socket, under a supervisor that restarts "
        "them (plus one proxywrite worker); 0: one process serves both services, no "
        "supervisor. Per-table max_connections and cache_size are then divided among "
        "the workers: they bound the whole service.",
    )
    log_level: str = _setting("info", "Log level: debug, info, warning, error.")
    log_destination: str = _setting(
        "stderr",
        "Where log lines go: stderr; syslog (/dev/log, facility $syslog_facility, tag "
        "$syslog_name/pyproxymap); or postlog (Postfix's postlogd, "
        "$queue_directory/public/$postlog_service_name, which writes $maillog_file).",
    )
    user: str = _setting(
        "",
        "Account to run as once the sockets are bound, when started as root "
        "(default: main.cf's mail_owner); it must not have user or group ID 0.",
    )
    unprivileged: bool = _setting(
        True,
        "Started as root: give root up once the sockets are bound and run as user, as "
        "Postfix's proxymap does (master.cf unpriv column y). false keeps root, as a "
        "Postfix service with unpriv n (not recommended: every table is then opened as root).",
    )
    chroot: bool = _setting(
        False,
        "Started as root: chroot to $queue_directory once the sockets are bound, as a "
        "Postfix service with chroot y in master.cf; table files are then named "
        "relative to it.",
    )
    #: Not a command-line setting: per-table options from the TOML file.
    tables: TableSettings = field(default_factory=TableSettings)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_name_length, self.max_value_length, self.max_attributes)

    @property
    def service_names(self) -> list[str]:
        return [s.strip() for s in self.services.split(",") if s.strip()]

    def validate(self) -> Settings:
        for name in self.service_names:
            if name not in ("proxymap", "proxywrite"):
                raise ValueError(f"unknown service {name!r} in services (proxymap, proxywrite)")
        for name, *_ in definitions():
            value = getattr(self, name)
            if name == "workers":
                if value < 0:
                    raise ValueError(f"workers must not be negative, not {value}")
            elif isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if self.metrics_address and not self.metrics_address.rpartition(":")[2].isdigit():
            raise ValueError(f"metrics_address {self.metrics_address!r}: expected host:port")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"unknown log_level {self.log_level!r}")
        if self.log_destination not in ("stderr", "syslog", "postlog"):
            raise ValueError(
                f"unknown log_destination {self.log_destination!r} (stderr, syslog, postlog)"
            )
        return self


def definitions() -> list[tuple[str, type, Any, str]]:
    """(name, type, default, help) of every setting, in definition order."""
    hints = get_type_hints(Settings)
    return [
        (f.name, hints[f.name], f.default, f.metadata["help"])
        for f in fields(Settings)
        if "help" in f.metadata
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` option per setting (default None: "not given")."""
    group = parser.add_argument_group("pyproxymap settings (also in pyproxymap.toml)")
    for name, kind, default, text in definitions():
        if kind is bool:  # --chroot / --no-chroot
            group.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default: {'yes' if default else 'no'})",
            )
            continue
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=None,
            help=f"{text} (default: {default!r})",
        )


def load(toml_path: Path | None, args: argparse.Namespace | None = None) -> Settings:
    """Settings from the TOML file (when it exists) overridden by command-line options."""
    values: dict[str, Any] = {}
    if toml_path is not None and toml_path.exists():
        with toml_path.open("rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{toml_path}: {e}") from None
        known = {name: kind for name, kind, _, _ in definitions()}
        values["tables"] = TableSettings.from_toml(
            data.pop("table_defaults", {}), data.pop("tables", {}), str(toml_path)
        )
        for name, value in data.items():
            if name not in known:
                raise ValueError(f"{toml_path}: unknown setting {name!r}")
            if known[name] is bool and not isinstance(value, bool):
                raise ValueError(f"{toml_path}: {name} must be true or false, not {value!r}")
            values[name] = known[name](value)
    if args is not None:
        for name, *_ in definitions():
            given = getattr(args, name, None)
            if given is not None:
                values[name] = given
    return replace(Settings(), **values).validate()
