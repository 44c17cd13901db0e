"""unix, environ, fail, randmap, unionmap, pipemap: unit tests, Postfix's regression data,
and answers compared with real postmap."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import time
from collections.abc import Coroutine
from inspect import isawaitable
from pathlib import Path
from typing import Any

import pytest

from pyproxymap.tables.base import (
    Maybe,
    OpenContext,
    Table,
    TableConfigError,
    TableError,
    TableRetry,
    Unsupported,
    ascii_fold,
    utf8_fold,
)
from pyproxymap.tables.composite import ComposedTable
from pyproxymap.tables.registry import driver_for
from pyproxymap.tables.unionmap import UnionmapTable
from pyproxymap.tables.unix import UnixTable
from pyproxymap.wire.proxymap import (
    FIXED,
    FOLD_FIX,
    FOLD_MUL,
    PATTERN,
    SEQ_FIRST,
    SRC_RHS_IS_FILE,
    TRY1NULL,
)
from tests.unit.test_texthash import (
    POSTFIX_TESTS,
    Fold,
    Postfix,
    needs_postfix_tests,
    postfix,  # noqa: F401  (fixture)
    write,
)


class LaterTable(Table):
    """``later:name``: answers like ``static:name``, but only after an await (a backend)."""

    def lookup(self, key: bytes, flags: int) -> Coroutine[Any, Any, bytes | None]:
        async def answer() -> bytes | None:
            await asyncio.sleep(0)
            if self.ctx.name == "fail":
                raise TableRetry("later:fail: backend down")
            return None if self.ctx.name == "miss" else self.ctx.name.encode()

        return answer()


def open_spec(spec: str, fold: Fold = utf8_fold, flags: int = 0, writable: bool = False) -> Table:
    """Open a table as the table cache does, components included."""
    type_, _, name = spec.partition(":")
    driver = LaterTable if type_ == "later" else driver_for(type_)
    if driver is None:
        raise TableRetry(f"unsupported dictionary type: {type_}")

    def nested(component: str, instance_flags: int) -> Table:
        return open_spec(component, fold, instance_flags, writable)

    return driver.open(OpenContext(type_, name, flags, writable, fold, open_nested=nested))


def answer(result: Maybe[bytes | None]) -> bytes | None:
    """The answer, awaited when it comes later."""
    if not isawaitable(result):
        return result

    async def wait() -> bytes | None:
        return await result

    return asyncio.run(wait())


def get(table: Table, key: bytes, flags: int = 0) -> bytes | None:
    return answer(table.lookup(key, flags))


def error_of(spec: str, **kwargs: Any) -> TableError:
    with pytest.raises(TableError) as info:
        open_spec(spec, **kwargs)
    return info.value


# --- unix ----------------------------------------------------------------------------------


def test_unix_passwd_and_group_as_postfix_formats_them() -> None:
    passwd = open_spec("unix:passwd.byname")
    assert passwd.flags == FIXED
    for user in pwd.getpwall()[:5]:  # name:passwd:uid:gid:gecos:dir:shell
        assert get(passwd, user.pw_name.encode()) == ":".join(map(str, user)).encode()
    assert get(passwd, b"no-such-user-here") is None
    group = open_spec("unix:group.byname")
    assert get(group, b"root") == b"root:x:0:"
    for g in grp.getgrall():
        if len(g.gr_mem) > 1:  # members joined with commas
            expected = f"{g.gr_name}:{g.gr_passwd}:{g.gr_gid}:{','.join(g.gr_mem)}"
            assert get(group, g.gr_name.encode()) == expected.encode()


def test_unix_errors() -> None:
    assert str(error_of("unix:foo")) == "unknown table: unix:foo"
    err = error_of("unix:passwd.byname", writable=True)
    assert str(err) == "unix:passwd.byname map requires O_RDONLY access mode"
    with pytest.raises(Unsupported):
        open_spec("unix:passwd.byname").sequence(SEQ_FIRST, 0)


def test_unix_retries_once_when_the_database_is_unreachable() -> None:
    """Postfix's check at the first miss: no entry for uid 0 means the database is down."""
    table = open_spec("unix:passwd.byname")
    assert isinstance(table, UnixTable)

    def down() -> None:
        raise KeyError(0)

    table._uid0 = down
    with pytest.raises(TableRetry, match=r"^cannot access UNIX password database$"):
        get(table, b"no-such-user-here")
    assert get(table, b"no-such-user-here") is None  # Postfix checks only once


def test_unix_lookup_does_not_block_the_event_loop() -> None:
    table = open_spec("unix:passwd.byname")
    assert isinstance(table, UnixTable)

    def slow(name: str) -> bytes:
        time.sleep(0.3)  # an NSS backend that takes its time
        return b"slow"

    table._get = slow

    async def go() -> tuple[bytes | None, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        pending = table.lookup(b"x", 0)
        assert pending is not None and isawaitable(pending)
        value = await pending
        task.cancel()
        return value, ticks

    value, ticks = asyncio.run(go())
    assert value == b"slow" and ticks >= 10


# --- environ -------------------------------------------------------------------------------


def test_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("pyproxymap_test_var", "hello")
    table = open_spec("environ:x")
    assert table.flags == FIXED
    assert get(table, b"pyproxymap_test_var") == b"hello"
    assert get(table, b"pyproxymap_no_such_var") is None
    assert get(table, b"") is None
    monkeypatch.delenv("pyproxymap_set_by_update", raising=False)
    table.update(b"pyproxymap_set_by_update", b"v", 0)
    assert get(table, b"pyproxymap_set_by_update") == b"v"
    monkeypatch.delenv("pyproxymap_set_by_update")
    with pytest.raises(TableConfigError, match="setenv"):
        table.update(b"a=b", b"v", 0)
    with pytest.raises(Unsupported):
        table.delete(b"pyproxymap_test_var", 0)


def test_environ_utf8_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environb, b"pyproxymap_bad", b"\xff")
    with pytest.raises(TableConfigError, match="non-UTF-8 value"):
        get(open_spec("environ:x"), b"pyproxymap_bad")
    assert get(open_spec("environ:x", ascii_fold), b"pyproxymap_bad") == b"\xff"


# --- fail ----------------------------------------------------------------------------------


def test_fail() -> None:
    table = open_spec("fail:x", flags=TRY1NULL)
    assert table.flags == PATTERN | TRY1NULL
    for call in (lambda: table.lookup(b"k", 0), lambda: table.sequence(SEQ_FIRST, 0)):
        with pytest.raises(TableRetry):
            call()
    with pytest.raises(Unsupported):
        table.update(b"k", b"v", 0)  # read-only: as Postfix, no update method
    with pytest.raises(Unsupported):
        table.delete(b"k", 0)
    writer = open_spec("fail:x", writable=True)
    with pytest.raises(TableRetry):
        writer.update(b"k", b"v", 0)
    with pytest.raises(TableRetry):
        writer.delete(b"k", 0)


# --- randmap -------------------------------------------------------------------------------


def test_randmap() -> None:
    table = open_spec("randmap:{a, b,c {d e}}")
    assert table.flags == PATTERN
    assert {get(table, b"k") for _ in range(200)} == {b"a", b"b", b"c", b"{d e}"}
    assert get(open_spec("randmap:{ only }"), b"") == b"only"


@pytest.mark.parametrize("name", ["123", "{ 123 ", "{ 123 }x", "{}", "{ , }", " {a}"])
def test_randmap_syntax_errors(name: str) -> None:
    err = error_of(f"randmap:{name}")
    assert isinstance(err, TableConfigError)
    assert str(err) == f'bad syntax: "randmap:{name}"; need "randmap:{{value...}}"'


def test_randmap_rhs_is_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("this-is-file1\n")
    table = open_spec(f"randmap:{{ {tmp_path}/f }}", flags=SRC_RHS_IS_FILE)
    assert get(table, b"k") == b"dGhpcy1pcy1maWxlMQo="
    err = error_of("randmap:{/nonexistent}", flags=SRC_RHS_IS_FILE)
    assert isinstance(err, TableRetry)


# --- unionmap and pipemap ------------------------------------------------------------------


def test_union_joins_with_commas_as_postfix() -> None:
    assert get(open_spec("unionmap:{static:{ }, static:a}"), b"k") == b"a"
    assert get(open_spec("unionmap:{static:a, static:{ }}"), b"k") == b"a,"
    assert get(open_spec("unionmap:{static:{ }}"), b"k") is None
    assert get(open_spec("unionmap:{inline:{a=1}, inline:{b=2}}"), b"c") is None


def test_pipe_passes_empty_values_on() -> None:
    assert get(open_spec("pipemap:{static:{ }}"), b"k") == b""
    assert get(open_spec("pipemap:{static:{ }, inline:{{=x}}}"), b"k") == b"x"


@pytest.mark.parametrize("type_", ["unionmap", "pipemap"])
def test_flags_come_from_the_first_component(type_: str) -> None:
    first_pattern = open_spec(f"{type_}:{{cidr:{{}}, inline:{{a=1}}}}", flags=TRY1NULL)
    assert first_pattern.flags == PATTERN | TRY1NULL
    first_fixed = open_spec(f"{type_}:{{inline:{{a=1}}, cidr:{{}}}}", flags=TRY1NULL)
    assert first_fixed.flags == FIXED | TRY1NULL
    assert isinstance(first_fixed, ComposedTable)
    assert all(c.ctx.instance_flags == TRY1NULL for c in first_fixed.components)


def test_each_component_folds_by_its_own_kind() -> None:
    union = open_spec("unionmap:{cidr:{{1.2.3.4 ip}}, inline:{a=1}}")
    assert get(union, b"A", FOLD_FIX) == b"1"  # the whole is PATTERN: not folded for it
    assert get(union, b"A", 0) is None
    pipe = open_spec("pipemap:{static:A, inline:{a=x}}")
    assert get(pipe, b"k", FOLD_FIX) == b"x"
    assert get(pipe, b"k", FOLD_MUL) is None  # inline is FIXED: FOLD_MUL leaves it alone


def test_components_that_answer_later() -> None:
    union = open_spec("unionmap:{static:a, later:b, inline:{k=c}, later:miss, later:d}")
    pending = union.lookup(b"k", 0)
    assert isawaitable(pending)
    assert answer(pending) == b"a,b,c,d"
    assert open_spec("unionmap:{static:a, static:b}").lookup(b"k", 0) == b"a,b"  # no coroutine
    pipe = open_spec("pipemap:{inline:{k=v}, later:w, inline:{w=x}}")
    assert get(pipe, b"k") == b"x"
    assert pipe.lookup(b"other", 0) is None  # a miss before the later one: answered at once
    with pytest.raises(TableRetry, match="backend down"):
        get(open_spec("unionmap:{static:a, later:fail}"), b"k")
    with pytest.raises(TableRetry, match="backend down"):
        get(open_spec("pipemap:{later:k, later:fail}"), b"k")


def test_component_errors_propagate() -> None:
    with pytest.raises(TableRetry):
        get(open_spec("unionmap:{static:one, fail:x}"), b"k")
    pipe = open_spec("pipemap:{inline:{k1=v1}, fail:x}")
    assert get(pipe, b"k0") is None
    with pytest.raises(TableRetry):
        get(pipe, b"k1")
    bad_value = "unionmap:{static:a, static:\udcff}"  # a non-UTF-8 value: CONFIG, as Postfix
    with pytest.raises(TableConfigError, match="non-UTF-8 value"):
        get(open_spec(bad_value), b"k")
    assert get(open_spec(bad_value, ascii_fold), b"k") == b"a,\xff"


@pytest.mark.parametrize("type_", ["unionmap", "pipemap"])
@pytest.mark.parametrize(
    "name", ["{}", "{ , }", "{abc}", "{static:a, b}", "static:a", "{static:a}x"]
)
def test_composite_syntax_errors(type_: str, name: str) -> None:
    err = error_of(f"{type_}:{name}")
    assert isinstance(err, TableConfigError)
    assert str(err) == f'bad syntax: "{type_}:{name}"; need "{type_}:{{type:name...}}"'


def test_composite_open_errors() -> None:
    assert str(error_of("unionmap:{static:a, nosuch:x}")) == "unsupported dictionary type: nosuch"
    assert "O_RDONLY" in str(error_of("pipemap:{static:a}", writable=True))
    with pytest.raises(TableConfigError, match="component tables cannot be opened here"):
        UnionmapTable.open(OpenContext("unionmap", "{static:a}"))


def test_composite_changed_and_close(tmp_path: Path) -> None:
    path = write(tmp_path / "t", b"1.2.3.4 a\n")
    union = open_spec(f"unionmap:{{static:x, cidr:{path}}}")
    assert not union.changed()
    path.write_bytes(b"1.2.3.4 b\n")
    assert union.changed()
    union.close()


def test_composite_utf8_key(caplog: pytest.LogCaptureFixture) -> None:
    assert get(open_spec("unionmap:{static:a}"), b"\xff") is None
    assert caplog.messages == [
        'unionmap:{static:a}: non-UTF-8 key "?": malformed UTF-8 or invalid codepoint'
    ]


# --- Postfix's own regression data ---------------------------------------------------------


def transcript(spec: str, gets: list[str], flags: int = 0) -> list[str]:
    """What Postfix's dict_open driver prints (less its ``owner=`` lines)."""
    try:
        table = open_spec(spec, ascii_fold, flags)
    except TableError as e:
        opened: Table | str = str(e)
        out = [f"./dict_open: error: {e}"]
    else:
        opened, out = table, []
    for key in gets:
        out.append(f"> get {key}")
        if isinstance(opened, str):
            out += [f"./dict_open: warning: {spec} is unavailable. {opened}", f"{key}: error"]
            continue
        try:
            value = get(opened, key.encode())
        except TableError:
            out.append(f"{key}: error")
            continue
        out.append(f"{key}: not found" if value is None else f"{key}={value.decode()}")
    return out


def ref_lines(name: str) -> list[str]:
    return [
        line for line in (POSTFIX_TESTS / name).read_text().splitlines() if "owner=" not in line
    ]


def script_runs(name: str) -> list[tuple[str, list[str]]]:
    """The tables and ``get`` keys of Postfix's dict_union_test.in-style shell scripts."""
    text = (POSTFIX_TESTS / name).read_text()
    return [
        (spec, re.findall(r"^get (.*)$", body, re.M))
        for spec, body in re.findall(
            r"\./dict_open '([^']*)' read <<EOF\n(.*?)^EOF$", text, re.S | re.M
        )
    ]


@needs_postfix_tests
@pytest.mark.parametrize("test", ["dict_union_test", "dict_pipe_test"])
def test_postfix_composite_ref(test: str) -> None:
    got = []
    for spec, gets in script_runs(f"{test}.in"):
        got += [f"+ ./dict_open {spec} read", *transcript(spec, gets)]
    assert got == ref_lines(f"{test}.ref")


@needs_postfix_tests
def test_postfix_random_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dict_random_file1").write_text("this-is-file1\n")
    got = transcript("randmap:{123 123}", ["foo", "bar"])
    for name in ("123", "{ 123 ", "{ 123 }x"):
        got += transcript(f"randmap:{name}", ["foo"])
    assert got == ref_lines("dict_random.ref")
    got = transcript("randmap:{fooxx}", ["foo"], SRC_RHS_IS_FILE)
    got += transcript("randmap:{ dict_random_file1 }", ["foo", "bar"], SRC_RHS_IS_FILE)
    assert got == ref_lines("dict_random_file.ref")


# --- compared with real postmap ------------------------------------------------------------

SPECS = [
    "unix:passwd.byname",
    "unix:group.byname",
    "unix:foo",
    "environ:x",
    "fail:x",
    "randmap:{only}",
    "randmap:{{a b}}",
    "randmap:{}",
    "randmap:{ 123 }x",
    "unionmap:{static:one,static:two,inline:{foo=three}}",
    "unionmap:{cidr:{{1.2.3.4 ip}}, inline:{a=1, root=r}}",
    "unionmap:{static:{ },static:a}",
    "unionmap:{static:a,static:{ }}",
    "unionmap:{static:{ }}",
    "unionmap:{unix:passwd.byname, environ:x}",
    "unionmap:{static:one,fail:fail}",
    "unionmap:{}",
    "unionmap:{abc}",
    "pipemap:{inline:{k1=v1,k2=v2},inline:{v2=v3}}",
    "pipemap:{inline:{k1=v1},fail:fail}",
    "pipemap:{static:ROOT, unix:passwd.byname}",
    "pipemap:{static:A,inline:{a=x}}",
    "pipemap:{cidr:{{1.2.3.4 1.2.3.5}},cidr:{{1.2.3.5 five}}}",
    "pipemap:{x}",
]
KEYS = [
    b"a", b"A", b"foo", b"k1", b"k2", b"root", b"ROOT", b"nobody", b"daemon", b"no-such-user",
    b"1.2.3.4", b"pyproxymap_test_var", b"PYPROXYMAP_TEST_VAR", b"",
]  # fmt: skip


def our_answers(spec: str, fold: Fold) -> list[tuple[bytes, tuple[int, bytes, str | None]]]:
    """``(key, (exit code, stdout, fatal error))`` as ``postmap -q KEY spec`` would print them.

    A table that fails every lookup is asked two keys only: postmap sleeps after a fatal error.
    """
    try:
        table = open_spec(spec, fold, FOLD_FIX)
    except TableError as e:
        return [(key, (1, b"", str(e))) for key in KEYS[:2]]
    answers = []
    for key in KEYS:
        folded = fold(key) if table.flags & FIXED else key  # as the service folds it
        try:
            value = get(table, folded, FOLD_FIX)
        except TableError:
            answers.append((key, (1, b"", f"table {spec}: query error")))
            continue
        answers.append((key, (1, b"", None) if value is None else (0, value + b"\n", None)))
    if all(fatal for _, (_, _, fatal) in answers):
        return answers[:2]
    return answers


@pytest.mark.interop
def test_same_as_postmap(
    postfix: Postfix,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("pyproxymap_test_var", "env value")
    cases = [(spec, key, ours) for spec in SPECS for key, ours in our_answers(spec, postfix.fold)]
    fatal = [case for case in cases if case[2][2]]
    for group, batch in ((fatal, len(fatal)), ([c for c in cases if not c[2][2]], 64)):
        answers = postfix.run_all([("-q", key, spec) for spec, key, _ in group], batch)
        theirs = [(a.rc, a.stdout, a.fatal and a.fatal.removesuffix(": Application error"))
                  for a in answers]  # fmt: skip
        assert [(spec, key, ours) for spec, key, ours in group] == [
            (spec, key, got) for (spec, key, _), got in zip(group, theirs, strict=True)
        ]
