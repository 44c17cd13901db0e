"""The proxymap allow-list, built from main.cf as Postfix 3.12's authorize_proxied_maps()."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxymap.config.allowlist import (
    READ_PARAM,
    WRITE_PARAM,
    AllowList,
    build_allowlist,
    extpar,
    strip_proxy,
    tokens,
)
from pyproxymap.config.maincf import MainCf

log = logging.getLogger("test.allowlist")


def maincf(root: Path, text: str) -> MainCf:
    (root / "main.cf").write_text(f"queue_directory = {root}/q\n" + text)
    return MainCf.load(root)


def read_tables(root: Path, text: str) -> dict[str, str]:
    return dict(build_allowlist(maincf(root, text), writer=False, log=log).tables)


def proxy_read_maps(root: Path, value: str) -> set[str]:
    return set(read_tables(root, f"proxy_read_maps = {value}\n"))


def test_acceptance_example(tmp_path):
    root = tmp_path
    cf = maincf(
        root,
        f"compatibility_level = 3.6\n"
        f"local_tables = proxy:texthash:{root}/t\n"
        f"\tproxy:inline:{{a=1, {{ b = text, with comma }}}}\n"
        f"proxy_read_maps = $local_tables, ${{maybe_maps?proxy:static:conditional}}"
        f" ${{unset_maps?proxy:static:never}}\n"
        f"    {{ proxy:static:grouped, attr=ignored }}\n"
        f"    unionmap:{{proxy:texthash:{root}/u1, texthash:{root}/u2}}\n"
        f"    proxy:static:hello proxy:texthash:{root}/missing\n"
        f"maybe_maps = something\n"
        f"proxy_write_maps = proxy:texthash:{root}/t\n",
    )
    reader = build_allowlist(cf, writer=False, log=log)
    assert set(reader.tables) == {
        f"texthash:{root}/t",
        "inline:{a=1, { b = text, with comma }}",
        "static:conditional",
        "static:grouped",
        f"texthash:{root}/u1",
        "static:hello",
        f"texthash:{root}/missing",
    }
    assert not reader.approves("static:never")
    assert not reader.approves(f"texthash:{root}/u2")
    assert not reader.approves("unix:passwd.byname")  # the default list is overridden
    assert set(reader.tables.values()) == {READ_PARAM}
    writer = build_allowlist(cf, writer=True, log=log)
    assert dict(writer.tables) == {f"texthash:{root}/t": WRITE_PARAM}


def test_default_allowlist_approves_passwd_byname(tmp_path):
    cf = maincf(tmp_path, "")
    reader = build_allowlist(cf, writer=False, log=log)
    assert dict(reader.tables) == {"unix:passwd.byname": READ_PARAM}
    assert build_allowlist(cf, writer=True, log=log).tables == {}


def test_default_lists_pick_up_tables_set_in_named_parameters(tmp_path):
    text = (
        "virtual_alias_maps = proxy:hash:/etc/postfix/virtual\n"
        "header_checks = proxy:regexp:/etc/postfix/header_checks\n"
        "smtpd_sender_restrictions = check_sender_access proxy:hash:/etc/postfix/senders\n"
        "smtp_requiretls_policy = proxy:hash:/etc/postfix/reqtls\n"  # only newer Postfix
        "address_verify_map = proxy:btree:$data_directory/verify\n"
    )
    cf = maincf(tmp_path, text)
    assert set(build_allowlist(cf, writer=False, log=log).tables) == {
        "unix:passwd.byname",
        "hash:/etc/postfix/virtual",
        "regexp:/etc/postfix/header_checks",
        "hash:/etc/postfix/senders",
        "hash:/etc/postfix/reqtls",
    }
    assert set(build_allowlist(cf, writer=True, log=log).tables) == {
        "btree:/var/lib/postfix/verify"
    }


@pytest.mark.parametrize(
    ("value", "approved"),
    [
        ("proxy:proxy:static:x", {"static:x"}),
        ("PROXY:static:x Proxy:static:y hash:/x", set()),
        ("[::1]/128 !proxy:static:x -proxy:static:y 127.0.0.1", set()),
        ("proxy", set()),
        # 3.12 looks for ':' before it strips proxy:, so these get in (and are still
        # never served: a request without ':' is answered BAD).
        ("proxy:noclass", {"noclass"}),
        ("proxy:", {""}),
        ("pipemap:{proxy:static:a, {proxy:static:b, x=y}}", {"static:a", "static:b"}),
        ("unionmap:{unionmap:{proxy:static:deep}} unionmap:proxy:static:nobrace", {"static:deep"}),
        ("{}, { }, {proxy:static:first proxy:static:second}", {"static:first"}),
        ("proxy:static:{a, b}", {"static:{a, b}"}),
        ("check_client_access proxy:cidr:/etc/c,permit", {"cidr:/etc/c"}),
    ],
)
def test_token_rules(tmp_path, value, approved):
    assert proxy_read_maps(tmp_path, value) == approved


@pytest.mark.parametrize(
    ("value", "warning"),
    [
        ("{ proxy:static:x", "missing '}' in \"{ proxy:static:x\""),
        ("{proxy:static:x}junk", "syntax error after '}' in \"{proxy:static:x}junk\""),
        ("unionmap:{proxy:static:x}y", "syntax error after '}' in \"{proxy:static:x}y\""),
    ],
)
def test_syntax_errors_warn_and_continue(tmp_path, caplog, value, warning):
    with caplog.at_level(logging.WARNING, logger=log.name):
        tables = proxy_read_maps(tmp_path, f"proxy:static:before {value}")
    assert tables == {"static:before"}
    assert caplog.messages == [f"bad syntax in proxy_read_maps content: {warning}"]


def test_file_references_are_read_line_by_line(tmp_path, caplog):
    listed = tmp_path / "listed"
    listed.write_text(
        "# comment\nproxy:static:one, hash:/not/proxied\n  proxy:static:continued\n"
        f"{{ proxy:static:grouped }}\n{tmp_path}/nested\n"
    )
    (tmp_path / "nested").write_text(f"proxy:static:nested\n{listed}\n")  # refers back
    with caplog.at_level(logging.WARNING, logger=log.name):
        tables = read_tables(tmp_path, f"proxy_read_maps = {listed} {{ {tmp_path}/missing }}\n")
    assert tables == {
        "static:one": str(listed),
        "static:continued": str(listed),
        "static:grouped": str(listed),
        "static:nested": f"{tmp_path}/nested",
    }
    assert f"open {tmp_path}/missing: No such file or directory" in caplog.messages
    assert any("skipping recursive reference" in m for m in caplog.messages)


def test_restriction_classes_count_for_the_reader_only(tmp_path):
    cf = maincf(
        tmp_path,
        "smtpd_restriction_classes = cls1, cls2\tundefined_class\n"
        "cls1 = check_sender_access proxy:hash:/etc/postfix/c1, reject\n"
        "cls2 = ${cls2_extra?{check_client_access proxy:cidr:/etc/postfix/c2}}\n"
        "cls2_extra = yes\n"
        "proxy_read_maps = proxy:hash:/etc/postfix/c1\n",
    )
    reader = build_allowlist(cf, writer=False, log=log)
    assert dict(reader.tables) == {
        "hash:/etc/postfix/c1": READ_PARAM,  # the first origin is kept
        "cidr:/etc/postfix/c2": "smtpd_restriction_classes",
    }
    assert build_allowlist(cf, writer=True, log=log).tables == {}


def test_approves_and_hint():
    reader = AllowList(writer=False, tables={"hash:/etc/x": READ_PARAM})
    assert reader.parameter == READ_PARAM
    assert reader.approves("hash:/etc/x") and reader.approves("proxy:proxy:hash:/etc/x")
    assert not reader.approves("HASH:/etc/x") and not reader.approves("hash:/etc/x ")
    assert reader.hint("proxy:hash:/etc/y") == (
        "to approve this table for read-only access, list proxy:hash:/etc/y"
        " in main.cf:proxy_read_maps"
    )
    writer = AllowList(writer=True, tables={})
    assert writer.parameter == WRITE_PARAM
    assert writer.hint("btree:/v") == (
        "to approve this table for read-write access, list proxy:btree:/v"
        " in main.cf:proxy_write_maps"
    )


def test_extpar():
    assert extpar("{a {b} c}") == ("a {b} c", None)
    assert extpar("{a}b")[1] == "syntax error after '}' in \"{a}b\""
    assert extpar("{a {b}")[1] == "missing '}' in \"{a {b}\""


@settings(derandomize=True)
@given(st.text(st.sampled_from("ab:/ ,\t\r\n"), max_size=30))
def test_tokens_without_braces_split_on_separators(text):
    assert list(tokens(text)) == [t for t in re.split(r"[, \t\r\n]", text) if t]


@settings(derandomize=True)
@given(st.text(st.sampled_from("ab{}, \t"), max_size=30))
def test_tokens_group_braces(text):
    found = list(tokens(text))
    assert all("{" in t or not re.search(r"[, \t]", t) for t in found)
    assert list(tokens(" ".join(found))) == found
    pos = 0
    for token in found:  # tokens are pieces of the text, in order
        pos = text.index(token, pos) + len(token)


@settings(derandomize=True)
@given(st.integers(0, 4), st.text(st.sampled_from("ab:/"), max_size=10))
def test_strip_proxy(count, rest):
    assert strip_proxy("proxy:" * count + rest) == strip_proxy(rest)
    assert not strip_proxy("proxy:" * count + rest).startswith("proxy:")
