"""cdb: D. J. Bernstein's constant database ``NAME.cdb``, as Postfix's dict_cdb reads it.

Postfix reads cdb with tinycdb; the format is djb's, which every cdb tool
shares. The reader is a few lines here rather than a PyPI package: python-cdb
is unmaintained since 2013, and pure-cdb (the maintained one) trusts the file:
its probe loop has no bound, so a corrupt hash table with no empty slot makes a
lookup spin forever, and bad offsets raise whatever slicing them causes. This
reader bounds the probe and checks every offset as tinycdb does, so a corrupt
file is a clear temporary error.

The file is read into memory at open: postmap writes a new cdb beside the old
and renames it over, so the bytes read are a consistent snapshot until
``changed()`` has the table reopened; nothing that truncates the file in place
can crash the server, as it could through a memory map.

cdb has no sequence operation in Postfix (its proxymap dies on one); here the
base class answers it as unsupported.
"""

from __future__ import annotations

import os
import struct
import time

from .base import OpenContext, TableRetry
from .indexed import IndexedTable
from .source import file_identity, printable, read_fd, refuse_writes

HEADER = 2048  # 256 (position, slot count) pairs, one hash table each
_PAIR = struct.Struct("<II")


def cdb_hash(key: bytes) -> int:
    """djb's hash: h = 5381, then h = (h * 33) ^ byte, in 32 bits."""
    h = 5381
    for byte in key:
        h = ((h * 33) & 0xFFFFFFFF) ^ byte
    return h


class CdbTable(IndexedTable):
    suffix = ".cdb"

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        refuse_writes(ctx)  # Postfix: only O_RDONLY, or O_WRONLY|O_CREAT|O_TRUNC (postmap)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise TableRetry(f"open database {self.shown}: {e.strerror}") from e
        try:
            self._data, st = read_fd(fd)
        except OSError as e:
            raise TableRetry(f"read {self.shown}: {e.strerror}") from e
        self._identity = file_identity(st)
        if len(self._data) < HEADER:
            raise TableRetry(f"open database {self.shown}: not a cdb file (too short)")
        # The data end where the first hash table starts (tinycdb's bound for records).
        self._data_end = min(max(_PAIR.unpack_from(self._data)[0], HEADER), len(self._data))
        self._warn_if_older(ctx, st)

    def _warn_if_older(self, ctx: OpenContext, st: os.stat_result) -> None:
        """Postfix's warning when the source file is newer (and not just being edited)."""
        try:
            source = os.stat(ctx.name)
        except OSError:
            return
        if int(st.st_mtime) < int(source.st_mtime) < time.time() - 100:
            ctx.log.warning(
                "database %s is older than source file %s", self.shown, printable(ctx.name)
            )

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        return self._find(key)

    def _get(self, key: bytes) -> bytes | None:
        data, end = self._data, self._data_end
        if len(key) >= end:
            return None
        h = cdb_hash(key)
        table, slots = _PAIR.unpack_from(data, (h & 0xFF) * 8)
        if not slots:
            return None
        if slots > len(data) // 8 or table < end or slots * 8 > len(data) - table:
            raise self._corrupt("hash table outside the file")
        slot = (h >> 8) % slots
        for _ in range(slots):
            slot_hash, record = _PAIR.unpack_from(data, table + slot * 8)
            if not record:
                return None
            if slot_hash == h:
                if record > end - 8:
                    raise self._corrupt("record outside the data")
                key_len, value_len = _PAIR.unpack_from(data, record)
                start = record + 8
                if key_len == len(key):
                    if start + key_len > end:
                        raise self._corrupt("key outside the data")
                    if data[start : start + key_len] == key:
                        if start + key_len + value_len > end:
                            raise self._corrupt("value outside the data")
                        return data[start + key_len : start + key_len + value_len]
            slot = (slot + 1) % slots
        return None

    def _corrupt(self, what: str) -> TableRetry:
        return TableRetry(f"error reading {self.shown}: corrupt cdb file: {what}")
