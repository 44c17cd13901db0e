"""main.cf reading and $-expansion, checked against real `postconf` where it can be."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyproxymap.config import defaults
from pyproxymap.config.defaults import COMPUTED, DEFAULTS, PROXY_READ_MAPS_NAMES
from pyproxymap.config.maincf import ConfigError, MainCf, logical_lines, split_nameval

needs_postconf = pytest.mark.skipif(shutil.which("postconf") is None, reason="needs postconf")

#: Parameters that 3.12 defines differently from the installed 3.7 oracle.
CHANGED_SINCE_37 = {"proxy_read_maps"}


def confdir(root: Path, text: str) -> Path:
    """A config dir whose main.cf is text; master.cf exists so postconf stays quiet.

    main.cf is backdated: Postfix rereads a file changed in the last second until
    it "cools down", which costs postconf up to two seconds.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "main.cf").write_text(text)
    (root / "master.cf").write_text("")
    past = time.time() - 10
    os.utime(root / "main.cf", (past, past))
    return root


def load(root: Path, text: str, **overrides: str) -> MainCf:
    return MainCf.load(confdir(root, text), overrides)


def with_refs(text: str, names: list[str]) -> str:
    """postconf only knows a parameter of its own invention once something refers to it."""
    return text + "\npyproxymap_test_refs = " + " ".join(f"${n}" for n in names) + "\n"


def normalize(value: str) -> str:
    """postconf prints values with each run of white space collapsed to one space."""
    return " ".join(re.split(r"[ \t\r\n]+", value.strip(" \t\r\n")))


def postconf(root: Path, *names: str, flags: tuple[str, ...] = ("-x",)) -> dict[str, str] | None:
    """name -> value as `postconf -c root` prints them, or None when postconf fails.

    A fatal error makes postconf sleep a second before it exits: stop it at once.
    """
    with subprocess.Popen(
        ["postconf", "-c", str(root), *flags, *names],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        if any(": fatal: " in line for line in proc.stderr):
            proc.kill()
            return None
        output = proc.stdout.read()
    if proc.returncode != 0:
        return None
    values = {}
    for line in output.splitlines():
        name, _, value = line.partition(" =")
        values[name] = value[1:]
    return values


# --- reading main.cf -----------------------------------------------------------------


def test_logical_lines_join_continuations_and_drop_comments():
    text = "a = one\n  two\n# comment\n\ttab\n\n   \n  # indented comment\n  three\nb = x # kept\n"
    assert list(logical_lines(text, "t")) == [(1, "a = one  two\ttab  three"), (9, "b = x # kept")]


def test_logical_lines_without_final_newline_and_crlf():
    assert list(logical_lines("a = 1\r\n b\r\nc = 2", "t")) == [(1, "a = 1\r b\r"), (3, "c = 2")]


def test_logical_line_starting_with_whitespace_is_skipped_with_warning(caplog):
    text = "  orphan\n  more\nname = value\n"
    with caplog.at_level(logging.WARNING):
        assert list(logical_lines(text, "f")) == [(3, "name = value")]
    assert 'f: logical line must not start with whitespace: "  orphan  more"' in caplog.text


def test_null_byte_ends_the_line_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert list(logical_lines("a = b\0c\n d\n", "f")) == [(1, "a = b")]
    assert "f, line 1-2: text after null byte may be ignored" in caplog.text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("name = value", ("name", "value")),
        ("name=value", ("name", "value")),
        ("  name\t=\t value with = sign \t", ("name", "value with = sign")),
        ("name =", ("name", "")),
        ("a:b = c", ("a:b", "c")),
    ],
)
def test_split_nameval(line, expected):
    assert split_nameval(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [("= value", "missing attribute name"), ("name value", "missing '=' after attribute name")],
)
def test_split_nameval_errors(line, reason):
    with pytest.raises(ValueError, match=reason):
        split_nameval(line)


def test_line_without_equals_is_fatal_with_line_number(tmp_path):
    with pytest.raises(ConfigError, match=r"main.cf, line 3: missing '=' after attribute name"):
        load(tmp_path, "a = 1\n# c\nbogus line\n")


def test_missing_main_cf_or_config_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"open .*main\.cf: No such file or directory"):
        MainCf.load(tmp_path)
    with pytest.raises(ConfigError, match="No such file or directory"):
        MainCf.load(tmp_path / "nonexistent")


def test_later_definition_wins_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cf = load(tmp_path, "a = 1\na = 2\n")
    assert cf.get("a") == "2"
    assert "line 2: overriding earlier entry: a=1" in caplog.text


def test_precedence_override_then_main_cf_then_default(tmp_path):
    cf = load(tmp_path, "mail_owner = pf\nmy = $mail_owner\n", mail_owner="$other", other="o")
    assert cf.raw("mail_owner") == "$other"
    assert cf.get("my") == "o"
    assert cf.get("queue_directory") == "/var/spool/postfix"
    assert cf.raw("nonexistent") is None and cf.get("nonexistent") is None
    assert cf.get("config_directory") == str(tmp_path)


# --- expansion ---------------------------------------------------------------------


def expand(text: str, **params: str) -> str:
    return MainCf("/etc/postfix", params).expand(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$x ${x} $(x)", "X X X"),
        ("$x_y.$x-", "XY.X-"),
        ("$undefined|${undefined}|", "||"),
        ("$$x $${x} $$$x", "$x ${x} $X"),
        ("${x?yes}|${x:no}|${e?yes}|${e:no}|${u:no}", "yes|||no|no"),
        ("${x?{ {braced} }}|${x?a:b}|${x?{a}:{b}}|${e?{a} : {b}}", " {braced} |a:b|a|b"),
        ("${x?$y}|${e:${x}$y}", "Y|XY"),
        ("${x??foo:{b}ar}", "?foo:{b}ar"),
        ("${ x }", "X"),
        ("${{$x} == {X}}|${{$x} != {X}}", "true|"),
        ("${{10} > {9} ? {num} : {str}}|${{10} > {9x} ? {num} : {str}}", "num|str"),
        ("${{3.10} >level {3.9} ? {yes} : {no}}", "yes"),
        ("${{2} <=level {2.0.0}?{le}}", "le"),
        ("${{$e} == {}?{empty}:{set}}", "empty"),
        ("${domain_to_ascii{ bücher.example }}|${domain_to_utf8{xn--bcher-kva.example}}",
         "xn--bcher-kva.example|bücher.example"),
    ],
)  # fmt: skip
def test_expand(text, expected):
    assert expand(text, x="X", x_y="XY", y="Y", e="") == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("cost: 5$", "empty macro name"),
        ("${x", "truncated macro reference"),
        ("${x?{a}junk}", '":" expected'),
        ("${x:{a}junk}", "unexpected input"),
        ("${x?{a}:{b}junk}", "unexpected input"),
        ("${x?{unbalanced}", "truncated macro reference"),
        ("${x?{a}", "truncated macro reference"),
        ("${x y}", "attribute name syntax error"),
        ("${{a} ~= {b}}", "expected at"),
        ("${{a} == b}", '"{expression}" expected'),
        ("${{a} ==foo {b}}", "bad operator suffix"),
        ("${{a} == {b} junk}", '"?" or ":" expected'),
        ("${{3.x} <level {3}}", "malformed compatibility level syntax"),
        ("${{99999999999999999999} == {1}}", "bad conversion"),
        ("${nosuchfn{x}}", 'unknown function "nosuchfn"'),
        ("${domain_to_ascii{x} y}", "unexpected input"),
    ],
)
def test_expand_errors(text, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        expand(text, x="X")


def test_unbalanced_braces_inside_conditional():
    with pytest.raises(ConfigError, match="unbalanced"):
        expand("$(x?{a)", x="X")  # $(...) balances only parentheses


def test_reference_loop_is_an_error_not_a_hang():
    with pytest.raises(ConfigError, match="a: macro processing error: unreasonable macro call"):
        MainCf("/etc/postfix", {"a": "x $b", "b": "$a"}).get("a")
    # Postfix restarts its nesting count in each relational operand and would crash here.
    loop = MainCf("/etc/postfix", {"a": "${{$a} == {x}?y}"})
    with pytest.raises(ConfigError, match="unreasonable macro call nesting"):
        loop.get("a")


def chain(length: int) -> str:
    """main.cf where p0 refers to p1 ... refers to p<length>, whose value is "end"."""
    lines = [f"p{i} = $p{i + 1}" for i in range(length)] + [f"p{length} = end"]
    return "\n".join(lines) + "\n"


def test_nesting_limit_is_100_levels_as_in_postfix():
    ok = MainCf("/x", dict(split_nameval(line) for line in chain(100).splitlines()))
    assert ok.get("p0") == "end"
    too_deep = MainCf("/x", dict(split_nameval(line) for line in chain(101).splitlines()))
    with pytest.raises(ConfigError, match="unreasonable macro call nesting"):
        too_deep.get("p0")


# --- typed getters -------------------------------------------------------------------


def typed(**params: str) -> MainCf:
    return MainCf("/etc/postfix", params)


def test_get_bool():
    cf = typed(a="YES", b="No", c="maybe", d="$b")
    assert cf.get_bool("a") is True and cf.get_bool("b") is False and cf.get_bool("d") is False
    with pytest.raises(ConfigError, match="bad boolean configuration: c = maybe"):
        cf.get_bool("c")
    with pytest.raises(ConfigError, match="unknown parameter"):
        cf.get_bool("nonexistent")
    assert typed().get_bool("smtputf8_enable") is False  # compatibility_level 0
    assert typed(compatibility_level="3.6").get_bool("smtputf8_enable") is True


@pytest.mark.parametrize(
    ("value", "expected"), [("10", 10), ("-3", -3), ("+7", 7), ("2147483647", 2**31 - 1)]
)
def test_get_int(value, expected):
    assert typed(n=value).get_int("n") == expected


@pytest.mark.parametrize("value", ["", "10x", "1.5", "2147483648", "x"])
def test_get_int_errors(value):
    with pytest.raises(ConfigError, match="bad numerical configuration"):
        typed(n=value).get_int("n")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_idle", "100s", 100),
        ("max_idle", "7", 7),  # default "100s": seconds
        ("ipc_timeout", "2m", 120),
        ("daemon_timeout", "5h", 18000),
        ("t", "1d", 86400),
        ("t", "2w", 1209600),
        ("t", "5sxyz", 5),  # Postfix looks only at the first unit letter
        ("t", "s", 0),  # strtol reads no digits: zero
    ],
)
def test_get_time(name, value, expected):
    assert typed(**{name: value}).get_time(name) == expected


def test_get_time_defaults():
    assert (typed().get_time("ipc_timeout"), typed().get_time("daemon_timeout")) == (3600, 18000)


@pytest.mark.parametrize("value", ["", "-1", "10y", "10 s", "4000w", "2147483648"])
def test_get_time_errors(value):
    with pytest.raises(ConfigError, match="bad time value or unit"):
        typed(t=value).get_time("t")


# --- defaults --------------------------------------------------------------------------


def test_every_default_reference_is_defined():
    """Each $name in a default resolves, except legacy names that Postfix leaves undefined."""
    legacy = {
        "virtual_maps",
        "authorized_verp_clients",
        "tlsproxy_client_policy",
        "postscreen_whitelist_interfaces",
        "smtpd_client_connection_limit_exceptions",
    }
    referenced = {
        name for value in DEFAULTS.values() for name in re.findall(r"\$\{?([A-Za-z0-9_]+)", value)
    } - {"domain_to_ascii"}
    assert referenced - legacy <= set(DEFAULTS) | set(COMPUTED) | {"config_directory"}


def test_head_defaults():
    cf = typed()
    assert cf.raw("local_recipient_maps") == "proxy:unix:passwd.byname $alias_maps"
    assert cf.get("alias_maps") == "hash:/etc/aliases, nis:mail.aliases"
    assert cf.get("address_verify_map") == "btree:/var/lib/postfix/verify_cache"
    assert "$smtpd_tls_loglevel_maps" in cf.raw("proxy_read_maps")
    assert cf.raw("proxy_read_maps").split() == [f"${n}" for n in PROXY_READ_MAPS_NAMES]
    # 3.7's default dropped the legacy value instead of using it.
    legacy = typed(tlsproxy_client_policy="hash:/x", smtp_tls_policy_maps="hash:/y")
    assert legacy.get("tlsproxy_client_policy_maps") == "hash:/x"


def test_computed_host_defaults(monkeypatch):
    monkeypatch.setattr(defaults, "_gethostname", lambda: "mx")
    assert typed().get("myhostname") == "mx.localdomain"
    assert typed().get("mydomain") == "localdomain"
    assert typed(mydomain="example.org").get("myhostname") == "mx.example.org"
    assert typed(myhostname="a.b.example").get("mydomain") == "b.example"
    assert typed(mydomain="x.$myhostname").get("myhostname") == "mx.x."  # no loop
    assert (
        typed(mydomain="ex.org")
        .get("smtp_requiretls_policy")
        .startswith("inline:{{ex.org=opportunistic}, {.ex.org=opportunistic}")
    )
    monkeypatch.setattr(defaults, "_gethostname", lambda: "mx.example.com")
    assert typed(mydomain="other").get("myhostname") == "mx.example.com"


def test_mynetworks_styles(monkeypatch):
    import ipaddress

    interfaces = (
        (ipaddress.ip_address("127.0.0.1"), 8),
        (ipaddress.ip_address("10.1.2.3"), 16),
        (ipaddress.ip_address("fe80::1"), 64),
    )
    monkeypatch.setattr(defaults, "_interfaces", lambda: interfaces)
    assert typed().get("mynetworks") == "127.0.0.0/8 10.1.0.0/16 [fe80::]/64"
    assert (
        typed(compatibility_level="2").get("mynetworks") == "127.0.0.1/32 10.1.2.3/32 [fe80::1]/128"
    )
    assert typed(mynetworks_style="class").get("mynetworks") == "127.0.0.0/8 10.0.0.0/8 [fe80::]/64"
    with pytest.raises(ConfigError, match="bad mynetworks_style"):
        typed(mynetworks_style="bogus").get("mynetworks")


# --- properties --------------------------------------------------------------------------

text_without_dollar = st.text(st.characters(blacklist_characters="$\0"), max_size=40)


@settings(derandomize=True)
@given(text_without_dollar)
def test_text_without_dollar_is_unchanged(text):
    assert expand(text) == text


@settings(derandomize=True)
@given(st.text(st.characters(blacklist_characters="\0"), max_size=40))
def test_doubled_dollars_are_literal(text):
    assert expand(text.replace("$", "$$")) == text


names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=20
).map(lambda v: v.strip())


@settings(derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(names, values, max_size=8))
def test_written_parameters_read_back_raw(tmp_path, params):
    cf = load(tmp_path, "".join(f"{k} = {v}\n" for k, v in params.items()))
    assert {k: cf.raw(k) for k in params} == params


# --- against postconf ---------------------------------------------------------------------

TRICKY = [
    # Continuations, comments inside them, white space, CRLF.
    "a = one\n  two\n# comment\n\tthree\n\n  # indented comment\n  four\nb=x # not a comment\n"
    "c =\nd   =   spaced out   \ne = crlf\r\n",
    # Lazy references, undefined names, $$.
    "a = $b ${b}-$(b) $undefined. ${undefined}|\nb = late\nc = $$b $${b} $$$b\nd = $c$a\ne = x\n",
    # Conditionals and nested braces.
    "a = ${b?yes} ${b:no} ${u?yes} ${u:no} ${empty?yes} ${empty:no}\nb = B\nempty =\n"
    "c = ${b?{ {nested} braces }} ${u?{x}:{y z}} ${b?{$b}:{$u}} ${b??q:{w}e}\n"
    "d = ${b:$(c)} ${u:${b?${b}}} ${u:{ a, b }}\ne = ${ b }\n",
    # Relational and compatibility-level expressions.
    "compatibility_level = 3.6\na = ${{$compatibility_level} <level {2} ? {old} : {new}}\n"
    "b = ${{$compatibility_level} >=level {3.10} ? {y} : {n}} ${{10} < {9}?lt} ${{10} > {9}?gt}\n"
    "c = ${{abc} < {abd}} ${{x} == {x}} ${{} == {}?{empty}} ${{$a} != {new}:{same}}\n"
    "d = $relay_domains|$smtputf8_enable|$mynetworks_style|$smtpd_relay_restrictions\ne = x\n",
    # Built-in defaults that depend on what main.cf sets.
    "myhostname = host.example.com\nmydestination = $myhostname, $mydomain\n"
    "a = $mydomain $myorigin $mydestination $relay_domains $local_recipient_maps\n"
    "alias_maps = hash:/etc/postfix/aliases\nb = $virtual_alias_domains $fast_flush_domains\n"
    "virtual_alias_maps = proxy:hash:/v\nc = $address_verify_map\nd = x\ne = x\n",
    # Values with text that looks like syntax but is not.
    "a = {literal} braces, commas: colons? q=v\nb = 100% ${a}\nc = trailing \\\nd = x\ne = x\n",
    "mydomain = example.net\na = $myhostname\nb = $mydomain\nc = x\nd = x\ne = x\n",
]


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.interop
@needs_postconf
def test_expansion_matches_postconf(tmp_path, text):
    names = ["a", "b", "c", "d", "e"]
    root = confdir(tmp_path, with_refs(text, names))
    theirs = postconf(root, *names)
    assert theirs is not None
    ours = MainCf.load(root)
    assert {n: normalize(ours.get(n) or "") for n in names} == theirs


@pytest.mark.interop
@needs_postconf
def test_overrides_match_postconf_o(tmp_path):
    root = confdir(tmp_path, with_refs("a = $b main\nb = from-main\nc = $a\n", ["a", "b", "c"]))
    overrides = {"b": "from-o ${a?bad}", "a": "o-$c"}
    flags = ("-x", *[arg for n, v in overrides.items() for arg in ("-o", f"{n}={v}")])
    theirs = postconf(root, "b", flags=flags)
    assert theirs == {"b": normalize(MainCf.load(root, overrides).get("b"))}


@pytest.mark.parametrize(
    "value",
    ["cost 5$", "${b", "${b?{x}junk}", "${x y}", "${{a} ~= {b}}", "${{3.x} <level {2}}", "$a"],
)
@pytest.mark.interop
@needs_postconf
def test_errors_match_postconf(tmp_path, value):
    root = confdir(tmp_path, with_refs(f"a = {value}\nb = B\n", ["a"]))
    assert postconf(root, "a") is None
    with pytest.raises(ConfigError):
        MainCf.load(root).get("a")


@pytest.mark.parametrize(("length", "ok"), [(100, True), (101, False)])
@pytest.mark.interop
@needs_postconf
def test_nesting_limit_matches_postconf(tmp_path, length, ok):
    root = confdir(tmp_path, with_refs(chain(length), ["p0"]))
    assert (postconf(root, "p0") is not None) is ok
    if ok:
        assert MainCf.load(root).get("p0") == "end"
    else:
        with pytest.raises(ConfigError):
            MainCf.load(root).get("p0")


@pytest.mark.parametrize("compat", ["", "compatibility_level = 2\n", "compatibility_level = 3.6\n"])
@pytest.mark.interop
@needs_postconf
def test_defaults_match_postconf(tmp_path, compat):
    root = confdir(tmp_path, compat)
    names = sorted(set(DEFAULTS) | set(COMPUTED))
    theirs = postconf(root, *names)
    assert theirs is not None
    ours = MainCf.load(root)
    known = sorted(set(theirs) - CHANGED_SINCE_37)
    assert len(known) > 100
    assert {n: normalize(ours.get(n) or "") for n in known} == {n: theirs[n] for n in known}
    # 3.12 appends parameters to proxy_read_maps; the 3.7 part is the same.
    assert normalize(ours.get("proxy_read_maps")).startswith(theirs["proxy_read_maps"])


@pytest.mark.interop
@needs_postconf
def test_raw_defaults_match_postconf_d(tmp_path):
    root = confdir(tmp_path, "")
    theirs = postconf(root, *DEFAULTS, flags=("-d",))
    assert theirs is not None
    # 3.12 spells these differently, with the same expanded value (checked above).
    respelled = {"alias_maps", "address_verify_map", "postscreen_cache_map"}
    respelled |= {"tlsproxy_client_policy_maps"} | CHANGED_SINCE_37
    same = set(theirs) - respelled
    assert {n: normalize(DEFAULTS[n]) for n in same} == {n: theirs[n] for n in same}


# A small grammar of main.cf values for differential testing against postconf.
PARAMS = ["pa", "pb", "pc", "pd"]


def value_strategy(refs: list[str]) -> st.SearchStrategy[str]:
    names = st.sampled_from([*refs, "undefined_p", "compatibility_level"])
    words = st.text(st.sampled_from("xyz09 .,:?=-/"), min_size=1, max_size=6)
    levels = st.sampled_from(["2", "3.6", "3.10", "0", "1.2.3", "x"])
    ops = st.sampled_from(["==", "!=", "<", "<=", ">=", ">", "<level", ">=level"])

    def compound(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        braced = inner.map(lambda v: "{" + v + "}")
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(names, st.sampled_from("?:"), st.one_of(braced, words)).map(
                lambda t: "${" + "".join(t) + "}"
            ),
            st.tuples(names, braced, braced).map(lambda t: f"${{{t[0]}?{t[1]}:{t[2]}}}"),
            st.tuples(st.one_of(inner, levels), ops, st.one_of(inner, levels), braced, braced).map(
                lambda t: f"${{{{{t[0]}}} {t[1]} {{{t[2]}}} ? {t[3]} : {t[4]}}}"
            ),
        )

    refs_strategy = names.flatmap(
        lambda n: st.sampled_from([f"${n}", f"${{{n}}}", f"$({n})", f"$${n}"])
    )
    return st.recursive(st.one_of(words, refs_strategy), compound, max_leaves=6)


@st.composite
def main_cfs(draw) -> str:
    lines = [f"{name} = {draw(value_strategy(PARAMS[i + 1 :]))}" for i, name in enumerate(PARAMS)]
    if draw(st.booleans()):
        lines.insert(0, f"compatibility_level = {draw(st.sampled_from(['0', '2', '3.6']))}")
    return "\n".join(lines) + "\n"


@pytest.mark.interop
@needs_postconf
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(main_cfs())
def test_random_configs_match_postconf(tmp_path, text):
    root = confdir(tmp_path, with_refs(text, PARAMS))
    ours = MainCf.load(root)
    for name in PARAMS:
        theirs = postconf(root, name)
        try:
            mine = {name: normalize(ours.get(name) or "")}
        except ConfigError:
            mine = None
        assert mine == theirs, text
