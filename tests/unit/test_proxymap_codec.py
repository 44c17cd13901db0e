"""Requests and replies of both dialects, byte for byte as Postfix sends them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyproxymap.wire.attr import Decoder
from pyproxymap.wire.proxymap import (
    BAD_STATUS_ONLY,
    INST_MASK,
    LOOKUP,
    NEW_DIALECT,
    OLD_DIALECT,
    OPEN,
    SEQUENCE,
    UPDATE,
    ProtocolError,
    Request,
    Status,
    encode_reply,
    encode_request,
    parse_request,
)


def record(wire: bytes):
    (rec,) = Decoder().feed(wire)
    return rec


def test_postmap_lookup_request_parses():
    req = parse_request(
        record(
            b"request\x00lookup\x00table\x00hash:/tmp/pmref/hash\x00flags\x00524353\x00"
            b"key\x00alice@example.com\x00\x00"
        )
    )
    assert (req.op, req.table, req.dialect, req.flags, req.key) == (
        LOOKUP,
        "hash:/tmp/pmref/hash",
        OLD_DIALECT,
        524353,
        b"alice@example.com",
    )
    assert req.instance_flags == 524353 & INST_MASK


def test_new_dialect_is_detected_per_request():
    req = parse_request(
        record(
            b"request\x00lookup\x00table\x00t:x\x00instance_flags\x004\x00"
            b"flags\x00524353\x00key\x00k\x00\x00"
        )
    )
    assert (req.dialect, req.instance_flags, req.flags) == (NEW_DIALECT, 4, 524353)
    req = parse_request(
        record(b"request\x00open\x00table\x00t:x\x00instance_flags\x0016384\x00\x00")
    )
    assert (req.op, req.dialect, req.instance_flags) == (OPEN, NEW_DIALECT, 16384)


# Replies observed from Postfix 3.7 (proxymap-protocol.md §11, postfix-reference.md §3).
@pytest.mark.parametrize(
    "args,wire",
    [
        ((OPEN, OLD_DIALECT, Status.OK, 28), b"status\x000\x00flags\x0028\x00\x00"),
        ((OPEN, OLD_DIALECT, Status.DENY), b"status\x004\x00flags\x000\x00\x00"),
        ((LOOKUP, OLD_DIALECT, Status.NOKEY), b"status\x001\x00value\x00\x00\x00"),
        ((LOOKUP, OLD_DIALECT, Status.RETRY), b"status\x002\x00value\x00\x00\x00"),
        ((UPDATE, OLD_DIALECT, Status.DENY), b"status\x004\x00\x00"),
        ((SEQUENCE, OLD_DIALECT, Status.BAD), b"status\x003\x00key\x00\x00value\x00\x00\x00"),
        (
            (LOOKUP, NEW_DIALECT, Status.OK, 524353, b"", b"v"),
            b"status\x000\x00flags\x00524353\x00value\x00v\x00\x00",
        ),
        ((UPDATE, NEW_DIALECT, Status.DENY), b"status\x004\x00flags\x000\x00\x00"),
        (
            (SEQUENCE, NEW_DIALECT, Status.OK, 16, b"k", b"v"),
            b"status\x000\x00flags\x0016\x00key\x00k\x00value\x00v\x00\x00",
        ),
    ],
)
def test_reply_shapes(args, wire):
    assert encode_reply(*args) == wire


def test_lookup_hit_bytes():
    assert (
        encode_reply(LOOKUP, OLD_DIALECT, Status.OK, value=b"alice-value")
        == b"status\x000\x00value\x00alice-value\x00\x00"
    )


@pytest.mark.parametrize(
    "wire,reply",
    [
        # unknown request: status only
        (b"request\x00bogus\x00table\x00t:x\x00\x00", BAD_STATUS_ONLY),
        # key before flags
        (
            b"request\x00lookup\x00table\x00t:x\x00key\x00k\x00flags\x000\x00\x00",
            b"status\x003\x00value\x00\x00\x00",
        ),
        # missing key
        (
            b"request\x00lookup\x00table\x00t:x\x00flags\x000\x00\x00",
            b"status\x003\x00value\x00\x00\x00",
        ),
        (b"request\x00lookup\x00\x00", b"status\x003\x00value\x00\x00\x00"),
        # malformed integers
        (
            b"request\x00lookup\x00table\x00t:x\x00flags\x00abc\x00key\x00k\x00\x00",
            b"status\x003\x00value\x00\x00\x00",
        ),
        (
            b"request\x00open\x00table\x00t:x\x00flags\x000x10\x00\x00",
            b"status\x003\x00flags\x000\x00\x00",
        ),
        (
            b"request\x00sequence\x00table\x00t:x\x00instance_flags\x000\x00flags\x00x\x00function\x000"
            b"\x00\x00",
            b"status\x003\x00flags\x000\x00key\x00\x00value\x00\x00\x00",
        ),
    ],
)
def test_malformed_requests_get_bad_in_the_request_shape(wire, reply):
    with pytest.raises(ProtocolError) as e:
        parse_request(record(wire))
    assert e.value.reply == reply


def test_first_attribute_not_request_closes():
    with pytest.raises(ProtocolError) as e:
        parse_request(record(b"key\x00v\x00\x00"))
    assert e.value.reply is None


def test_trailing_attribute_is_tolerated_like_postfix():
    req = parse_request(
        record(b"request\x00lookup\x00table\x00t:x\x00flags\x000\x00key\x00k\x00extra\x00x\x00\x00")
    )
    assert req.key == b"k" and req.extra == (b"extra",)


def test_leading_space_in_flags_is_accepted_like_postfix():
    assert (
        parse_request(record(b"request\x00open\x00table\x00t:x\x00flags\x00 0\x00\x00")).flags == 0
    )


keys = st.binary(max_size=50).filter(lambda b: b"\0" not in b)


@given(
    st.sampled_from([OPEN, LOOKUP, UPDATE, SEQUENCE]),
    st.sampled_from([OLD_DIALECT, NEW_DIALECT]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    keys,
    keys,
)
def test_encode_request_parses_back(op, dialect, inst, flags, key, value):
    req = Request(op, "texthash:/x", dialect, inst, flags, key, value, 1)
    back = parse_request(record(encode_request(req)))
    assert (back.op, back.table, back.dialect) == (op, "texthash:/x", dialect)
    if op != OPEN or dialect == OLD_DIALECT:
        assert back.flags == flags
    if op in (LOOKUP, UPDATE):
        assert back.key == key
