"""main.cf, read and expanded exactly as Postfix daemons read and expand it.

Reading follows readlline(3) and split_nameval(3); expansion follows
mac_parse(3) and mac_expand(3) of the newest Postfix (3.12): ``$name``,
``${name}``, ``$(name)``, ``${name?text}``, ``${name:text}``, the ``{text}``
forms with the ternary ``?:``, relational expressions ``${{a} == {b} ? {x} :
{y}}`` including the ``<level`` family that compares compatibility levels, the
``domain_to_ascii{}`` / ``domain_to_utf8{}`` functions, and ``$$`` for a
literal dollar. An undefined ``$name`` expands to nothing.

Where Postfix would stop with a fatal error (a main.cf line without ``=``, a
macro syntax error, a reference loop) we raise ConfigError instead.

Files are decoded as UTF-8 with surrogateescape, so bytes that are not UTF-8
survive a round trip back to bytes unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import COMPUTED, DEFAULTS

_log = logging.getLogger(__name__)

#: C isspace() in the C locale: what readlline and split_nameval skip.
CSPACE = " \t\n\v\f\r"
#: Postfix's CHARS_SPACE: what mac_expand skips around operators and {text}.
_MAC_SPACE = " \t\r\n"
_OPERATOR_CHARS = "<>!=?+-*/~&|%"
_OPERATORS = ("==", "!=", "<", "<=", ">=", ">")
_OPERATORS_TEXT = " or ".join(f'"{op}"' for op in _OPERATORS)
#: mac_expand gives up beyond this many nested $name expansions.
_MAX_LEVEL = 100
#: Postfix restarts the nesting count inside relational operands and function
#: arguments, so a loop through those recurses until the process crashes. We
#: stop at this total depth instead, which legitimate settings never reach.
_MAX_TOTAL_DEPTH = 150
_ENCODING = ("utf-8", "surrogateescape")


class ConfigError(Exception):
    """The configuration cannot be used: Postfix would refuse to start with it."""


class _MacroError(ConfigError):
    """A $-expansion error, reported by MainCf.expand() with the parameter name."""


def decode(data: bytes) -> str:
    """Configuration bytes as text that encodes back to the same bytes."""
    return data.decode(*_ENCODING)


def logical_lines(text: str, source: str, log: logging.Logger = _log) -> Iterator[tuple[int, str]]:
    """(first line number, logical line) pairs, joined as readlline(3) joins them.

    Empty, all-white and ``#`` comment lines are dropped; a line that starts with
    white space continues the previous one (its newline is deleted, its leading
    white space kept). Comment and empty lines do not end a logical line.
    """
    physical = text.split("\n")
    if physical[-1] == "":  # the newline ending the last line starts no new one
        physical.pop()
    count = len(physical)
    index = 0
    while index < count:
        parts: list[str] = []
        first = 0
        while index < count:
            line = physical[index]
            index += 1
            stripped = line.lstrip(CSPACE)
            if not parts:
                first = index
            if stripped and stripped[0] != "#":
                parts.append(line)
            if parts and index < count:
                nxt = physical[index][:1] or "\n"
                if nxt != "#" and nxt not in CSPACE:
                    break
        logical = "".join(parts)
        if not logical:
            continue
        if "\0" in logical:
            where = f"line {first}" if first == index else f"line {first}-{index}"
            log.warning("%s, %s: text after null byte may be ignored", source, where)
        if logical[0] in CSPACE:
            shown = logical[:30] + ("..." if len(logical) > 30 else "")
            log.warning('%s: logical line must not start with whitespace: "%s"', source, shown)
            continue
        # Postfix handles the line as a C string: a null byte ends it.
        yield first, logical.split("\0", 1)[0]


def split_nameval(line: str) -> tuple[str, str]:
    """``name = value`` as split_nameval(3) splits it; ValueError with Postfix's reason."""
    rest = line.lstrip(CSPACE)
    if not rest or rest[0] == "=":
        raise ValueError("missing attribute name")
    end = 0
    while end < len(rest) and rest[end] not in CSPACE and rest[end] != "=":
        end += 1
    name, rest = rest[:end], rest[end:].lstrip(CSPACE)
    if not rest.startswith("="):
        raise ValueError("missing '=' after attribute name")
    return name, rest[1:].strip(CSPACE)


def _is_alnum(ch: str) -> bool:
    """C ISALNUM(): ASCII letters and digits only."""
    return ch.isascii() and ch.isalnum()


def _is_name_char(ch: str) -> bool:
    return _is_alnum(ch) or ch == "_"


def _skip(text: str, pos: int, chars: str = _MAC_SPACE) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _strtol(text: str, pos: int) -> tuple[int, int, bool]:
    """C strtol(text + pos, &end, 10): (value, end, out of range); end == pos when no digits."""
    start = _skip(text, pos, CSPACE)
    digits = start + 1 if start < len(text) and text[start] in "+-" else start
    end = digits
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    if end == digits:
        return 0, pos, False
    value = int(text[start:end])
    return value, end, not -(2**63) <= value < 2**63


def _compat_level(text: str) -> int:
    """compat_level_from_string(): "major[.minor[.patch]]" as one comparable number."""
    bounds = (2**43 - 1, 1023, 1023)  # 11+ bits major, 10 bits minor and patch
    level, pos = 0, 0
    for part, bound in enumerate(bounds):
        value, end, overflow = _strtol(text, pos)
        last = end == len(text)
        if end == pos or overflow or not 0 <= value <= bound or not (last or text[end] == "."):
            break
        level |= value << (10 * (2 - part))
        if last:
            return level
        if part == 2:
            break
        pos = end + 1
    raise _MacroError(f'malformed compatibility level syntax: "{text}"')


def _compare(left: str, op: str, right: str, numbers: Callable[[str], int] | None) -> bool:
    """Evaluate ``{left} op {right}``: numerically when both are all digits, else bytewise."""
    if numbers is not None:
        delta = numbers(left) - numbers(right)
    elif left.isascii() and left.isdigit() and right.isascii() and right.isdigit():
        if max(int(left), int(right)) >= 2**63:
            raise _MacroError(f"mac_exp_eval: bad conversion: {max(left, right, key=int)}")
        delta = int(left) - int(right)
    else:
        a, b = left.encode(*_ENCODING), right.encode(*_ENCODING)
        delta = (a > b) - (a < b)
    return {
        "==": delta == 0,
        "!=": delta != 0,
        "<": delta < 0,
        "<=": delta <= 0,
        ">=": delta >= 0,
        ">": delta > 0,
    }[op]


def _domain_to_ascii(name: str) -> str:
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        raise _MacroError(f"bad domain argument in: 'domain_to_ascii{{{name}}}'") from None


def _domain_to_utf8(name: str) -> str:
    if not name.isascii():
        return name
    try:
        return name.encode("ascii").decode("idna")
    except UnicodeError:
        raise _MacroError(f"bad domain argument in: 'domain_to_utf8{{{name}}}'") from None


# The named functions Postfix registers for main.cf (mac_midna.c). Python's idna
# codec implements IDNA 2003; Postfix uses ICU's UTS #46. They agree on
# ordinary names and differ on a few characters such as "ß".
_FUNCTIONS: Mapping[str, Callable[[str], str]] = {
    "domain_to_ascii": _domain_to_ascii,
    "domain_to_utf8": _domain_to_utf8,
}


@dataclass
class _Context:
    """One mac_expand() call: its output and its own nesting level."""

    out: list[str] = field(default_factory=list)
    level: int = 0


class _Expander:
    """mac_expand(3) with MAC_EXP_FLAG_RECURSE, as dict_eval() runs it for main.cf."""

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup
        self._depth = 0

    def expand(self, text: str) -> str:
        ctx = _Context()
        self._parse(text, ctx)
        return "".join(ctx.out)

    def _parse(self, text: str, ctx: _Context) -> None:
        """mac_parse(): split text into literals and $-expressions."""
        literal: list[str] = []

        def flush() -> None:
            if any(literal):
                self._callback(ctx, "".join(literal), is_expr=False)
            literal.clear()

        pos, end = 0, len(text)
        while pos < end:
            dollar = text.find("$", pos)
            if dollar < 0:
                literal.append(text[pos:])
                break
            literal.append(text[pos:dollar])
            if text.startswith("$$", dollar):
                literal.append("$")
                pos = dollar + 2
                continue
            flush()
            pos = dollar + 1
            if pos < end and text[pos] in "({":
                close = ")" if text[pos] == "(" else "}"
                opening, start, level = text[pos], pos + 1, 1
                pos = start
                while level > 0:
                    if pos >= end:
                        raise _MacroError(f'truncated macro reference: "{text}"')
                    level += (text[pos] == opening) - (text[pos] == close)
                    pos += 1
                expr = text[start : pos - 1]
            else:
                start = pos
                while pos < end and _is_name_char(text[pos]):
                    pos += 1
                expr = text[start:pos]
            if not expr:
                raise _MacroError(f'empty macro name: "{text}"')
            self._callback(ctx, expr, is_expr=True)
        flush()

    def _callback(self, ctx: _Context, text: str, is_expr: bool) -> None:
        """mac_expand_callback(): append a literal, or evaluate one $-expression."""
        if ctx.level > _MAX_LEVEL or self._depth >= _MAX_TOTAL_DEPTH:
            raise _MacroError(f'unreasonable macro call nesting: "{text}"')
        ctx.level += 1
        self._depth += 1
        try:
            if is_expr:
                self._expression(ctx, text)
            else:
                ctx.out.append(text)
        finally:
            ctx.level -= 1
            self._depth -= 1

    def _expression(self, ctx: _Context, text: str) -> None:
        end = len(text)
        pos = _skip(text, 0)
        if pos < end and text[pos] == "{":
            value, pos = self._relational(text, pos)
            op = text[pos : pos + 1]
            if op and op not in "?:":
                raise _MacroError(f'"?" or ":" expected at: "...}}>>>{text[pos : pos + 20]}"')
            pos += len(op)
        else:
            start = pos
            while True:
                after = _skip(text, pos)
                if after >= end:
                    name, op = text[start:pos], ""
                    break
                if text[after] in "?:":
                    name, op = text[start:pos], text[after]
                    pos = after + 1
                    break
                if text[after] == "{":
                    self._function(ctx, text[start:pos], text, after)
                    return
                if not _is_name_char(text[pos]):
                    where = f"...{text[:pos]}>>>{text[pos : pos + 20]}"
                    raise _MacroError(f'attribute name syntax error at: "{where}"')
                pos += 1
            value = self._lookup(name)
        if op == "?":
            payload, pos = self._operand(text, pos)
            if value:
                self._parse(payload, ctx)
            if pos >= end:
                return
            if text[pos] != ":":
                raise _MacroError(f'":" expected at: "...{payload}}}>>>{text[pos : pos + 20]}"')
            pos += 1
            op = ":"
        if op == ":":
            payload, pos = self._operand(text, pos)
            if not value:
                self._parse(payload, ctx)
            if pos < end:
                raise _MacroError(f'unexpected input at: "...{payload}}}>>>{text[pos : pos + 20]}"')
        elif value:
            self._parse(value, ctx)

    def _operand(self, text: str, pos: int) -> tuple[str, int]:
        """The text after ? or :, either {braced} or everything up to the end."""
        brace = _skip(text, pos)
        if brace < len(text) and text[brace] == "{":
            return self._curly(text, brace)
        return text[pos:], len(text)

    @staticmethod
    def _curly(text: str, pos: int, strip: bool = False) -> tuple[str, int]:
        """The payload of the balanced {...} at pos, and the position after it and any space."""
        start = _skip(text, pos + 1) if strip else pos + 1
        level, cur = 1, start
        while True:
            if cur >= len(text):
                raise _MacroError(f'unbalanced {{}} in attribute expression: "{text[pos:]}"')
            level += (text[cur] == "{") - (text[cur] == "}")
            if level <= 0:
                break
            cur += 1
        payload = text[start:cur].rstrip(CSPACE) if strip else text[start:cur]
        return payload, _skip(text, cur + 1)

    def _relational(self, text: str, pos: int) -> tuple[str, int]:
        """``{left} op {right}`` at pos: "true" or "" and the position after it."""
        left, pos = self._curly(text, pos)
        op_end = pos
        while op_end < len(text) and text[op_end] in _OPERATOR_CHARS:
            op_end += 1
        op = text[pos:op_end]
        if op not in _OPERATORS:
            raise _MacroError(
                f'{_OPERATORS_TEXT} expected at: "...{left}}}>>>{text[pos : pos + 20]}"'
            )
        pos = op_end
        numbers = None
        if pos < len(text) and _is_alnum(text[pos]):
            suffix_end = pos
            while suffix_end < len(text) and _is_alnum(text[suffix_end]):
                suffix_end += 1
            if text[pos:suffix_end] != "level":
                raise _MacroError(f'bad operator suffix at: "...{op}>>>{text[pos:suffix_end]}"')
            numbers, pos = _compat_level, suffix_end
        brace = _skip(text, pos)
        if brace >= len(text) or text[brace] != "{":
            raise _MacroError(
                f'"{{expression}}" expected at: "...{{{left}}} {op}>>>{text[pos : pos + 20]}"'
            )
        right, pos = self._curly(text, brace)
        result = _compare(self.expand(left), op, self.expand(right), numbers)
        return ("true" if result else ""), pos

    def _function(self, ctx: _Context, name: str, text: str, pos: int) -> None:
        """``${name{text}}``: a registered function applied to the expanded text."""
        arg, pos = self._curly(text, pos, strip=True)
        if pos < len(text):
            raise _MacroError(f'unexpected input at: "...{arg}}}>>>{text[pos : pos + 20]}"')
        if name not in _FUNCTIONS:
            raise _MacroError(f'unknown function "{name}" at"...>>>{name}{{{arg}}}"')
        ctx.out.append(_FUNCTIONS[name](self.expand(arg)))


class MainCf:
    """Parameter values as a Postfix daemon sees them.

    Precedence: ``-o name=value`` overrides, then main.cf, then Postfix's
    built-in default. Values are expanded when asked for, so a parameter may
    refer to one defined later in the file, as in Postfix.
    """

    def __init__(
        self,
        config_dir: str | Path,
        params: Mapping[str, str],
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.config_dir = Path(config_dir)
        self._params = dict(params)
        self._overrides = dict(overrides or {})
        self._computing: set[str] = set()

    @classmethod
    def load(
        cls, config_dir: str | Path = "/etc/postfix", overrides: Mapping[str, str] | None = None
    ) -> MainCf:
        """Read config_dir/main.cf as dict_load_fp() does: later definitions win."""
        path = Path(config_dir) / "main.cf"
        try:
            text = decode(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"open {path}: {os.strerror(exc.errno or 0)}") from exc
        params: dict[str, str] = {}
        for lineno, line in logical_lines(text, str(path)):
            try:
                name, value = split_nameval(line)
            except ValueError as exc:
                raise ConfigError(f'{path}, line {lineno}: {exc}: "{line}"') from None
            old = params.get(name)
            if old is not None and old != value:
                _log.warning(
                    "%s, line %d: overriding earlier entry: %s=%s", path, lineno, name, old
                )
            params[name] = value
        return cls(config_dir, params, overrides)

    def raw(self, name: str) -> str | None:
        """The unexpanded value, or None when the parameter is unknown and has no default."""
        for layer in (self._overrides, self._params):
            if name in layer:
                return layer[name]
        if name == "config_directory":
            return str(self.config_dir)
        if name in DEFAULTS:
            return DEFAULTS[name]
        if name in COMPUTED and name not in self._computing:
            # Postfix computes these before they are defined, so while one is
            # being computed a reference to it is undefined rather than a loop.
            self._computing.add(name)
            try:
                return COMPUTED[name](self.get)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            finally:
                self._computing.discard(name)
        return None

    def get(self, name: str) -> str | None:
        """The fully $-expanded value, or None when unknown and without default."""
        value = self.raw(name)
        return None if value is None else self.expand(value, name)

    def expand(self, text: str, what: str = "value") -> str:
        """Expand $name references in text against this configuration."""
        try:
            return _Expander(self.raw).expand(text)
        except _MacroError as exc:
            raise ConfigError(f"{what}: macro processing error: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{what}: macro processing error: nesting too deep") from None

    def _require(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise ConfigError(f"unknown parameter: {name}")
        return value

    def get_bool(self, name: str) -> bool:
        """ "yes" or "no" in any case, as Postfix's boolean parameters."""
        value = self._require(name)
        folded = value.lower() if value.isascii() else value  # strcasecmp folds ASCII only
        if folded == "yes":
            return True
        if folded == "no":
            return False
        raise ConfigError(f"bad boolean configuration: {name} = {value}")

    def get_int(self, name: str) -> int:
        """A whole number that fits a C int, as Postfix's integer parameters."""
        value = self._require(name)
        number, end, overflow = _strtol(value, 0)
        if not value or end != len(value) or overflow or not -(2**31) <= number < 2**31:
            raise ConfigError(f"bad numerical configuration: {name} = {value}")
        return number

    def get_time(self, name: str) -> int:
        """Seconds from a time value with an optional unit: s, m, h, d or w.

        Without a unit the value is in the unit of the parameter's default
        (first letter of the expanded default, as Postfix derives it), else in
        seconds. As in Postfix only the character right after the number counts.
        """
        value = self._require(name)
        default = DEFAULTS.get(name)
        unit_source = self.expand(default, name) if default is not None else ""
        default_unit = next((ch for ch in unit_source if ch.isascii() and ch.isalpha()), "s")
        number, end, overflow = _strtol(value, 0)
        if not value or overflow or not 0 <= number < 2**31:
            raise ConfigError(f"parameter {name}: bad time value or unit: {value}")
        unit = value[end] if end < len(value) else default_unit
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}.get(unit)
        if scale is None or (scale > 1 and number >= (2**31 - 1) // scale):
            raise ConfigError(f"parameter {name}: bad time value or unit: {value}")
        return number * scale
