"""Run Postfix's own proxy client (Debian's libpostfix-util/-global) against a server.

Run as a separate process (the library exits on a BAD or DENY answer, exactly
as a Postfix daemon would):

    python postfix_lib.py CONFDIR TABLE get KEY...             # proxymap service
    python postfix_lib.py CONFDIR TABLE put KEY VALUE...       # proxywrite service
    python postfix_lib.py CONFDIR TABLE del KEY...
    python postfix_lib.py CONFDIR TABLE seq [--write]
    python postfix_lib.py CONFDIR - verify-update ADDR STATUS TEXT...   # verify(8)'s client
    python postfix_lib.py CONFDIR - verify-query ADDR...

``put`` takes any number of KEY VALUE pairs, ``del`` any number of keys and
``verify-update`` any number of ADDR STATUS TEXT triples, one request each, in
order. ``--flags=N`` replaces the dictionary flags the table is opened with
(default: postmap -q's for reads, verify(8)'s for writes).

prints one JSON object per result, as soon as it has it:
{"op", "key", "status": found|ok|notfound|retry|config, "value"}.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

LIBDIR = "/usr/lib/postfix"
READ_FLAGS = 0x1 | 0x4000 | 0x80000  # DUP_WARN | FOLD_FIX | UTF8_REQUEST, as postmap -q
WRITE_FLAGS = 0x80 | 0x100 | 0x10000 | 0x80000  # DUP_REPLACE | SYNC_UPDATE | OPEN_LOCK | UTF8
DICT_ERRORS = {0: "notfound", -1: "retry", -2: "config"}


def load(confdir: str) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    os.environ["MAIL_CONFIG"] = confdir
    util = ctypes.CDLL(f"{LIBDIR}/libpostfix-util.so", mode=ctypes.RTLD_GLOBAL)
    glob = ctypes.CDLL(f"{LIBDIR}/libpostfix-global.so", mode=ctypes.RTLD_GLOBAL)
    p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    util.dict_open3.restype, util.dict_open3.argtypes = p, [s, s, i, i]
    util.dict_register.argtypes = [s, p]
    util.dict_lookup.restype, util.dict_lookup.argtypes = s, [s, s]
    util.dict_update.restype, util.dict_update.argtypes = i, [s, s, s]
    util.dict_delete.restype, util.dict_delete.argtypes = i, [s, s]
    util.dict_sequence.restype = i
    util.dict_sequence.argtypes = [s, i, ctypes.POINTER(s), ctypes.POINTER(s)]
    util.dict_error.restype, util.dict_error.argtypes = i, [s]
    util.vstring_alloc.restype, util.vstring_alloc.argtypes = p, [ctypes.c_ssize_t]
    glob.verify_clnt_update.restype, glob.verify_clnt_update.argtypes = i, [s, i, s]
    glob.verify_clnt_query.restype = i
    glob.verify_clnt_query.argtypes = [s, ctypes.POINTER(i), p]
    glob.mail_conf_read()
    glob.mail_params_init()
    glob.mail_dict_init()
    return util, glob


def emit(**result: object) -> None:
    print(json.dumps(result), flush=True)


def verify(glob: ctypes.CDLL, why: int, op: str, args: tuple[str, ...]) -> None:
    """verify(8) requests, as smtpd and the delivery agents send them (``why``: a VSTRING)."""
    if op == "verify-update":
        for addr, status, text in zip(args[::3], args[1::3], args[2::3], strict=True):
            rc = glob.verify_clnt_update(addr.encode(), int(status), text.encode())
            emit(op=op, key=addr, rc=rc)
        return
    for addr in args:
        status = ctypes.c_int(-1)
        rc = glob.verify_clnt_query(addr.encode(), ctypes.byref(status), why)
        emit(op=op, key=addr, rc=rc, status=status.value)


def main(confdir: str, table: str, op: str, *args: str) -> None:
    options = [a for a in args if a.startswith("--")]
    args = tuple(a for a in args if not a.startswith("--"))
    util, glob = load(confdir)
    if op.startswith("verify-"):
        os.chdir(ctypes.c_char_p.in_dll(glob, "var_queue_dir").value)  # private/verify
        verify(glob, util.vstring_alloc(100), op, args)
        return
    write = op in ("put", "del") or "--write" in options
    flags = WRITE_FLAGS if write else READ_FLAGS
    for option in options:
        if option.startswith("--flags="):
            flags = int(option.removeprefix("--flags="), 0)
    mode = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    util.dict_register(b"t", util.dict_open3(b"proxy", table.encode(), mode, flags))

    def failed() -> str:
        return DICT_ERRORS.get(util.dict_error(b"t"), "error")

    if op == "get":
        for key in args:
            value = util.dict_lookup(b"t", key.encode())
            if value is None:
                emit(op=op, key=key, status=failed())
            else:
                emit(op=op, key=key, status="found", value=value.decode(errors="surrogateescape"))
    elif op == "put":
        for key, value in zip(args[::2], args[1::2], strict=True):
            rc = util.dict_update(b"t", key.encode(), value.encode())
            emit(op=op, key=key, status="ok" if rc == 0 else failed())
    elif op == "del":
        for key in args:
            rc = util.dict_delete(b"t", key.encode())
            emit(op=op, key=key, status="ok" if rc == 0 else failed())
    elif op == "seq":
        k, v = ctypes.c_char_p(), ctypes.c_char_p()
        function = 0  # DICT_SEQ_FUN_FIRST, then NEXT
        while util.dict_sequence(b"t", function, ctypes.byref(k), ctypes.byref(v)) == 0:
            emit(op=op, key=k.value.decode(), value=v.value.decode(), status="found")
            function = 1
        emit(op="seq-end", status=failed())


if __name__ == "__main__":
    main(*sys.argv[1:])
