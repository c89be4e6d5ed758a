"""`OutputDecoder`: raw child output to storable text, with a cap on what is kept."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskpool._output import REPLACEMENT, OutputDecoder
from tests.strategies import byte_chunks


def decode_all(chunks: Iterable[bytes], max_bytes: int = 1 << 20) -> str:
    decoder = OutputDecoder(max_bytes)
    return "".join(decoder.feed(chunk) for chunk in chunks) + decoder.finish()


def reference(data: bytes) -> str:
    """What the decoder must produce for `data` kept whole."""
    return data.decode("utf-8", "replace").replace("\0", REPLACEMENT)


def marker(max_bytes: int, dropped: int) -> str:
    return f"\n[taskpool: output cut at {max_bytes} bytes; {dropped} more bytes discarded]\n"


def test_replacement_is_u_fffd() -> None:
    """The replacement character is the Unicode one."""
    assert REPLACEMENT == "\ufffd"


def test_plain_text_passes_through() -> None:
    """Valid UTF-8 without NUL is stored unchanged."""
    assert decode_all([b"hello\n", "h\u00e9llo w\u00f6rld \u20ac \U0001f600\n".encode()]) == (
        "hello\nh\u00e9llo w\u00f6rld \u20ac \U0001f600\n"
    )


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"a\xffb", "a\ufffdb"),
        (b"\xfe\xff", "\ufffd\ufffd"),
        (b"\xc3(", "\ufffd("),
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # an encoded surrogate is not UTF-8
        (b"\xc0\xaf", "\ufffd\ufffd"),  # an overlong encoding is not UTF-8
    ],
)
def test_invalid_utf8_becomes_replacement_character(data: bytes, text: str) -> None:
    """Bytes that are not UTF-8 are stored as U+FFFD."""
    assert decode_all([data]) == text


def test_nul_becomes_replacement_character() -> None:
    """NUL, which no SQL text column stores, is stored as U+FFFD."""
    assert decode_all([b"a\x00b", b"\x00"]) == "a\ufffdb\ufffd"


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600"])
def test_character_split_across_feeds_decodes_whole(char: str) -> None:
    """A multi-byte character whose bytes arrive in separate reads is decoded whole."""
    encoded = char.encode()
    decoder = OutputDecoder(100)
    parts = [decoder.feed(bytes([b])) for b in b"<" + encoded + b">"]
    assert parts[1:-2] == [""] * (len(encoded) - 1)  # held back until complete
    assert "".join(parts) + decoder.finish() == f"<{char}>"


def test_partial_character_at_end_becomes_replacement_character() -> None:
    """Output that stops inside a character ends with U+FFFD on finish."""
    decoder = OutputDecoder(100)
    assert decoder.feed(b"ok\xe2\x82") == "ok"
    assert decoder.finish() == "\ufffd"


def test_output_up_to_the_cap_is_kept_without_marker() -> None:
    """Exactly `max_bytes` of output is kept whole and nothing is said about a cut."""
    decoder = OutputDecoder(10)
    assert decoder.feed(b"01234") == "01234"
    assert decoder.feed(b"56789") == "56789"
    assert decoder.feed(b"") == ""
    assert decoder.finish() == ""
    assert (decoder.bytes_seen, decoder.bytes_dropped) == (10, 0)


def test_cap_holds_exactly_and_marker_names_cut_and_dropped_bytes() -> None:
    """Past the cap nothing more is kept, and finish says where it cut and how much was dropped."""
    decoder = OutputDecoder(10)
    assert decoder.feed(b"0123456") == "0123456"
    assert decoder.feed(b"789abc") == "789"
    assert decoder.feed(b"defgh") == ""
    assert decoder.finish() == marker(10, 8)
    assert "output cut at 10 bytes; 8 more bytes discarded" in marker(10, 8)
    assert (decoder.bytes_seen, decoder.bytes_dropped) == (18, 8)


def test_cap_inside_a_character_keeps_only_bytes_before_it() -> None:
    """A cap that falls inside a multi-byte character stores the cut part as U+FFFD."""
    assert decode_all([b"ab\xe2\x82\xac"], max_bytes=3) == "ab\ufffd" + marker(3, 2)


def test_zero_cap_keeps_nothing() -> None:
    """With a cap of zero every byte is dropped and counted."""
    assert decode_all([b"abc", b"de"], max_bytes=0) == marker(0, 5)


@settings(max_examples=200, deadline=None)
@given(byte_chunks, st.integers(min_value=0, max_value=64))
def test_decoded_output_is_storable_and_faithful(chunks: list[bytes], max_bytes: int) -> None:
    """Any byte chunks decode to NUL-free valid text equal to a one-shot decode of what fits."""
    out = decode_all(chunks, max_bytes)
    assert "\0" not in out
    assert out.encode("utf-8").decode("utf-8") == out  # no lone surrogates
    data = b"".join(chunks)
    if len(data) <= max_bytes:
        assert out == reference(data)
    else:
        assert out == reference(data[:max_bytes]) + marker(max_bytes, len(data) - max_bytes)


@settings(max_examples=200, deadline=None)
@given(byte_chunks)
def test_chunking_does_not_change_the_text(chunks: list[bytes]) -> None:
    """However the bytes are split into reads, the stored text is the same."""
    data = b"".join(chunks)
    assert decode_all(chunks) == decode_all([data]) == decode_all([bytes([b]) for b in data])
