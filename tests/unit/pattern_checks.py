"""Checks shared by the regexp and pcre tests: Postfix's regression data, edge cases
valid in both syntaxes, and the comparison of our answers and warnings with postmap's."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass
from inspect import isawaitable
from pathlib import Path

import pytest

from pyproxymap.tables.base import OpenContext, TableError, utf8_fold
from pyproxymap.tables.patterns import PatternTable
from pyproxymap.tables.pcre import PcreTable
from pyproxymap.tables.regexp import RegexpTable
from tests.unit.test_texthash import POSTFIX_TESTS, Fold, Postfix, write

DRIVERS: dict[str, type[PatternTable]] = {"regexp": RegexpTable, "pcre": PcreTable}
#: What postmap says about empty results; postmap's, not the table's.
POSTMAP_ONLY = ("empty string result is not allowed", "should return NO RESULT")


@dataclass
class Printed:
    """What postmap printed (or would print): warnings, answers, a failed lookup."""

    warnings: list[str]
    stdout: bytes
    failed: bool


def open_table(kind: str, name: str | Path, fold: Fold = utf8_fold, flags: int = 0) -> PatternTable:
    return DRIVERS[kind](OpenContext(kind, str(name), instance_flags=flags, fold=fold))


def answer(table: PatternTable, key: bytes) -> bytes | None:
    """The lookup's answer, whether it came at once or from the background thread."""
    result = table.lookup(key, 0)
    if isawaitable(result):
        return asyncio.run(result)  # type: ignore[arg-type]
    return result


def regression_data(
    kind: str, suffix: str, flags: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> tuple[list[str], list[str]]:  # fmt: skip
    """Run dict_KIND{suffix}.in against dict_KIND{suffix}.map as Postfix's dict_open test
    driver does: our warnings and answers, and the .ref file's."""
    name = f"dict_{kind}{suffix}"
    shutil.copy(POSTFIX_TESTS / f"{name}.map", tmp_path)
    for n in (1, 2):  # what the Makefile writes for the _file variants
        (tmp_path / f"{name}{n}").write_text(f"this-is-file{n}\n")
    monkeypatch.chdir(tmp_path)
    table = open_table(kind, f"{name}.map", flags=flags)
    out = [f"warning: {m}" for m in caplog.messages]
    for line in (POSTFIX_TESTS / f"{name}.in").read_text().splitlines():
        key = line.split()[1]
        value = answer(table, key.encode())
        out.append(f"{key}: not found" if value is None else f"{key}={value.decode()}")
    ref = [
        line.removeprefix("./dict_open: ")
        for line in (POSTFIX_TESTS / f"{name}.ref").read_text().splitlines()
        if not line.startswith(("owner=", "> "))
    ]
    return out, ref


def inline_regression_data(kind: str) -> tuple[list[str], list[str]]:
    """dict_inline_KIND.ref: ``KIND:{{/foo/ got foo}}``."""
    table = open_table(kind, "{{/foo/ got foo}}")
    out = []
    for key in ("foo", "bar"):
        value = answer(table, key.encode())
        out += [f"> get {key}", f"{key}: not found" if value is None else f"{key}={value.decode()}"]
    return out, (POSTFIX_TESTS / f"dict_inline_{kind}.ref").read_text().splitlines()


def postmap_and_ours(
    postfix: Postfix, kind: str, spec_name: str, keys: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> tuple[Printed, Printed]:  # fmt: skip
    """What ``postmap -q - KIND:NAME`` would print on ``keys`` if it were our table, and what
    it prints: warnings (at open and during lookups), answers, whether a lookup failed.
    Keys must not hold newlines."""
    table = open_table(kind, spec_name, postfix.fold)
    ours, failed = [], []
    for key in keys:
        try:
            value = answer(table, key)
        except TableError as e:  # postmap exits, and what it printed is lost in its buffer
            failed.append(str(e))
            ours.clear()
            break
        if value is not None:
            ours.append(b"%s\t%s\n" % (key, value))
    run = subprocess.run(
        ["postmap", "-c", str(postfix.confdir), "-q", "-", f"{kind}:{spec_name}"],
        input=b"".join(key + b"\n" for key in keys), capture_output=True, timeout=30,
    )  # fmt: skip
    stderr = run.stderr.decode("utf-8", "replace").splitlines()
    warnings = [
        line.removeprefix("postmap: warning: ")
        for line in stderr
        if line.startswith("postmap: warning: ") and not any(s in line for s in POSTMAP_ONLY)
    ]
    failed_too = any(line.endswith(": query error") for line in stderr)
    return (
        Printed([*caplog.messages, *failed], b"".join(ours), bool(failed)),
        Printed(warnings, run.stdout, failed_too),
    )


def postmap_and_ours_file(
    postfix: Postfix, kind: str, tmp_path: Path, text: bytes, keys: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> tuple[Printed, Printed]:  # fmt: skip
    path = write(tmp_path / f"{kind}.map", text)
    return postmap_and_ours(postfix, kind, str(path), keys, caplog)


# --- edge cases valid in both syntaxes ------------------------------------------------------

SUBSTITUTIONS = (
    rb"/^(.*)@(.*)$/	user=$1 domain=${2} again=$(1) dollar=$$ not-a-group=$$1" b"\n"
    rb"/^([a-z]+)-(x)?-(y*)$/	[$1][$2][$3]" b"\n"
    rb"/^const$/	plain  text	with tab $$ and $$$$" b"\n"
    rb"/^nothing$/" b"\n"
    rb"/^big(1)$/	$01 ${1} $4294967297" b"\n"
    rb"/^(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)$/	$10 $9 ${10}" b"\n"
    rb"/^u(.)(.)$/	[$2$1]" b"\n"
    rb"/^(.*)$/	any=$1" b"\n"
)  # fmt: skip
SUBSTITUTION_KEYS = [
    b"joe@example.com",
    b"JOE@Example.COM",
    b"a@b@c",
    b"ab--",
    b"ab-x-yy",
    b"AB-X-",
    b"const",
    b"nothing",
    b"big1",
    b"abcdefghij",
    b"u12",
    "uß".encode(),
    b"u\xff",
    b"x" * 300,
    "Straße@bücher.de".encode(),
    "ключ@пример.рф".encode(),
    b"\xff\xfe@bad",
]

CONDITIONS = (
    b"if /^a/\n"
    b"if !/b/\n"
    b"/c/\ta-not-b-c\n"
    b"endif\n"
    b"/./\ta-any\n"
    b"endif\n"
    b"IF /^x/\n"
    b"/(y)/\tx-$1\n"
    b"EndIf\n"
    b"if/^z/\n"
    b"/./\tz\n"
    b"endif\n"
    b"if !!/^n/\n"
    b"/./\tdouble-negation\n"
    b"endif\n"
    b"/^q/\tq\n"
    b"endif\n"
    b"if /^w/   trailing junk\n"
    b"/wz/\twz\n"
    b"endif  junk\n"
    b"ifx /a/ b\n"
    b"endifx\n"
    b"if\n"
    b"if /^v/\n"
    b"/v1/\tv1\n"
    b"if /^vv/\n"
    b"/./\tvv\n"
)
CONDITION_KEYS = [b"ac", b"abc", b"a", b"xy", b"XY", b"x", b"z", b"n1", b"q", b"wz", b"v1",
                  b"vv", b"vx", b"other"]  # fmt: skip

ERRORS = (
    b"/unclosed\n"
    b"/a/q\tbad option\n"
    b"/(a)/\t$2\n"
    b"!/(a)/\t$1\n"
    b"/a/\t${\n"
    b"/a/\t$x and $y\n"
    b"/a/\t$0\n"
    b"/a/\t$\n"
    b"/a/\t$-1\n"
    b"/a/\t$1a\n"
    b"/a/\t${1\n"
    b"/a/\t$(1}\n"
    b"word\n"
    b"/a\\/b/\tescaped-delimiter\n"
    b"|p|i\tpipe-delimiters\n"
    b"#/a/ comment\n"
    b"  /indented/ at the start\n"
    b"/cont/\tcontinued\n"
    b"   line\n"
    b"/nul/\tbefore\0after\n"
    b"/(x)/\t${1}${1\n"
    b"/x/\tok\n"
    b"/\xc3\xa9/\tutf8-pattern\n"
    b"\xc3\xa9x\xc3\xa9\tnon-ascii-delimiter\n"
)  # fmt: skip
ERROR_KEYS = [b"a", b"a/b", b"P", b"cont", b"nul", b"x", "é".encode(), "É".encode(), b"x\xc3"]

CASES = {
    "substitutions": (SUBSTITUTIONS, SUBSTITUTION_KEYS),
    "conditions": (CONDITIONS, CONDITION_KEYS),
    "errors": (ERRORS, ERROR_KEYS),
}

INLINE_FORMS = [
    "{{/^a(.*)/ inline-$1}, { /b/ two words }, {#comment}, {if /c/}, {/d/ cd}, {endif}}",
    "{ , {/x/ y}, , }",
    "{}",
    "{{/a/ b} , {/(/ bad}, {/c/ d}}",
    "{{if /a/}, {/b/ ab}}",
    "{{/a/}}",
]
INLINE_KEYS = [b"abc", b"ABC", b"b", b"cd", b"d", b"x", b"c", b"ab", b"zzz"]
