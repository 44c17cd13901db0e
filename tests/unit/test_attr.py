"""The attr0 codec: framing, limits, and Postfix's integer parsing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyproxymap.wire.attr import AttrError, Decoder, Limits, encode, parse_uint

names = st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)
values = st.binary(max_size=200).filter(lambda b: b"\0" not in b)
records = st.lists(st.tuples(names, values), max_size=8)


@given(st.lists(records, min_size=1, max_size=5), st.data())
def test_any_split_of_any_records_decodes_to_the_same_records(recs, data):
    stream = b"".join(encode(r) for r in recs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = Decoder(Limits(max_name_length=20, max_value_length=200, max_attributes=8))
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[a:b])
    assert out == [[x for pair in r for x in pair] for r in recs]
    assert decoder.pending == 0


def test_the_worked_example_from_postfix_decodes():
    wire = (
        b"request\x00lookup\x00table\x00hash:/tmp/pmref/hash\x00flags\x00524353\x00"
        b"key\x00alice@example.com\x00\x00"
    )
    assert Decoder().feed(wire) == [
        [
            b"request",
            b"lookup",
            b"table",
            b"hash:/tmp/pmref/hash",
            b"flags",
            b"524353",
            b"key",
            b"alice@example.com",
        ]
    ]


def test_empty_value_and_empty_record():
    assert Decoder().feed(b"value\x00\x00\x00") == [[b"value", b""]]
    assert Decoder().feed(b"\x00") == [[]]


def test_incomplete_record_is_pending():
    d = Decoder()
    assert d.feed(b"request\x00look") == []
    assert d.pending
    assert d.feed(b"up\x00\x00") == [[b"request", b"lookup"]]
    assert d.pending == 0


@pytest.mark.parametrize(
    "stream",
    [
        b"\xff" * 70000 + b"\x00\x00",  # an oversized name, complete
        b"\xff" * 70000,  # an oversized name, still arriving
        b"key\x00" + b"v" * 300,  # an oversized value, still arriving
        b"".join(b"a\x00b\x00" for _ in range(9)) + b"\x00",  # too many attributes
    ],
)
def test_limits_are_enforced_as_soon_as_they_are_exceeded(stream):
    with pytest.raises(AttrError):
        Decoder(Limits(max_name_length=64, max_value_length=200, max_attributes=8)).feed(stream)


def test_record_size_is_bounded_while_it_arrives():
    d = Decoder(Limits(max_name_length=8, max_value_length=8, max_attributes=2))
    with pytest.raises(AttrError):
        for _ in range(10):
            d.feed(b"aaaa\x00bbbb\x00")


def test_encode_integers_as_postfix_unsigned():
    assert encode([("status", 0), ("flags", -1)]) == b"status\x000\x00flags\x004294967295\x00\x00"
    with pytest.raises(ValueError):
        encode([("key", b"a\x00b")])


@pytest.mark.parametrize(
    "text,value",
    [
        (b"0", 0),
        (b"524353", 524353),
        (b" 0", 0),
        (b"\t\n7", 7),
        (b"+5", 5),
        (b"-1", 0xFFFFFFFF),
        (b"-0", 0),
        (b"4294967296", 0),
        (b"4294967297", 1),
        (b"99999999999999999999999", 0xFFFFFFFF),
        (b"-4294967296", 0),
    ],
)
def test_parse_uint_accepts_what_sscanf_u_accepts(text, value):
    assert parse_uint(text) == value


@pytest.mark.parametrize(
    "text", [b"", b" ", b"0x10", b"abc", b"1 ", b"1x", b"--1", b"+", b"\xd9\xa1", b"1.0"]
)
def test_parse_uint_rejects_what_postfix_calls_malformed(text):
    assert parse_uint(text) is None


@given(st.integers(0, 0xFFFFFFFF))
def test_parse_uint_round_trips_unsigned(n):
    assert parse_uint(str(n).encode()) == n
