"""Postfix's dict_utf8 layer, for drivers whose keys or values come from outside.

With smtputf8_enable=yes, Postfix wraps every table it opens: a key that is
not UTF-8 is a miss (with a warning) and never reaches the driver; a value
that is not UTF-8 fails the lookup with a configuration error. Drivers that
validate their source text when they load it need none of this.
"""

from __future__ import annotations

from .base import OpenContext, TableConfigError
from .source import printable, utf8_enabled, valid_utf8

NON_UTF8 = "malformed UTF-8 or invalid codepoint"


def _bad(ctx: OpenContext, text: bytes) -> bool:
    return utf8_enabled(ctx) and not text.isascii() and not valid_utf8(text)


def key_rejected(ctx: OpenContext, key: bytes) -> bool:
    """True, after Postfix's warning, when the lookup must miss because the key is not UTF-8."""
    if not _bad(ctx, key):
        return False
    ctx.log.warning('%s: non-UTF-8 key "%s": %s', printable(ctx.spec), printable(key), NON_UTF8)
    return True


def checked_value(ctx: OpenContext, key: bytes, value: bytes | None) -> bytes | None:
    """The value, unless it is not UTF-8: then Postfix fails the lookup (CONFIG)."""
    if value is not None and _bad(ctx, value):
        raise TableConfigError(
            f'{printable(ctx.spec)}: key "{printable(key)}": '
            f'non-UTF-8 value "{printable(value)}": {NON_UTF8}'
        )
    return value
