"""Third-party table types: found through entry points, opened and looked up like built-ins.

Nothing is installed: ``entry_points`` as the registry sees it is replaced by
one that lists the example plugin of ``examples/plugin-table``.
"""

from __future__ import annotations

import logging
import os
import pwd
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from pyproxymap.tables import registry
from pyproxymap.tables.base import OpenContext, TableConfigError, ascii_fold
from pyproxymap.tables.static import StaticTable
from pyproxymap.wire.proxymap import FIXED

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin-table"
GROUP = "pyproxymap.tables"


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    """The entry points the registry will see; append to declare a plugin."""
    declared: list[EntryPoint] = []

    def entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in declared if ep.group == group]

    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(registry, "entry_points", entry_points)
    registry._plugins.cache_clear()
    registry.driver_for.cache_clear()
    yield declared
    registry._plugins.cache_clear()
    registry.driver_for.cache_clear()


def upper(name: str = "upper") -> EntryPoint:
    return EntryPoint(name=name, value="pyproxymap_upper:UpperTable", group=GROUP)


def test_plugin_type_is_found_opened_and_looked_up(plugins: list[EntryPoint]) -> None:
    plugins.append(upper())
    plugins.append(EntryPoint(name="other", value="nowhere:Nothing", group="another.group"))
    driver = registry.driver_for("upper")
    assert driver is not None and driver.__name__ == "UpperTable"
    assert "upper" in registry.known_types() and "other" not in registry.known_types()
    table = driver.open(OpenContext("upper", "{alice, Bob}", fold=ascii_fold))
    assert table.flags == FIXED
    assert table.lookup(b"alice", 0) == b"ALICE"
    assert table.lookup(b"bob", 0) == b"BOB"  # stored folded, as the server folds keys
    assert table.lookup(b"carol", 0) is None
    with pytest.raises(TableConfigError, match=r"^upper:x map requires O_RDONLY access mode$"):
        driver.open(OpenContext("upper", "x", writable=True))


def test_plugin_cannot_override_a_builtin_type(
    plugins: list[EntryPoint], caplog: pytest.LogCaptureFixture
) -> None:
    plugins.append(upper("static"))
    with caplog.at_level(logging.WARNING, logger="pyproxymap"):
        assert registry.driver_for("static") is StaticTable
        assert registry.known_types().count("static") == 1
    assert "plugin table type static ignored: it is a built-in type" in caplog.messages


@pytest.mark.parametrize("change", ["group-writable", "other-writable", "owned-by-nobody"])
def test_plugin_files_others_can_change_are_refused_as_postfix_refuses_them(
    plugins: list[EntryPoint],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    module = tmp_path / "pyproxymap_upper_copy.py"
    module.write_text((EXAMPLE / "pyproxymap_upper.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.append(EntryPoint(name="upper", value="pyproxymap_upper_copy:UpperTable", group=GROUP))
    if change == "owned-by-nobody":
        if os.geteuid() != 0:
            pytest.skip("chown needs root (CI runs as root)")
        os.chown(module, pwd.getpwnam("nobody").pw_uid, -1)
    else:
        module.chmod(0o664 if change == "group-writable" else 0o646)
    with caplog.at_level(logging.WARNING, logger="pyproxymap"):
        assert registry.driver_for("upper") is None
    assert (
        f"unsupported dictionary type: upper ({module}: file is owned or writable by other users)"
        in caplog.messages
    )
    assert "pyproxymap_upper_copy" not in sys.modules  # refused before any import


def test_a_plugin_only_root_or_we_can_change_is_loaded(
    plugins: list[EntryPoint], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module = tmp_path / "pyproxymap_upper_safe.py"
    module.write_text((EXAMPLE / "pyproxymap_upper.py").read_text())
    module.chmod(0o644)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.append(EntryPoint(name="upper", value="pyproxymap_upper_safe:UpperTable", group=GROUP))
    assert registry.driver_for("upper") is not None
