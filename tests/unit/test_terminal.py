"""Hostile task output against the terminal neutraliser: nothing a task prints may
drive the operator's terminal, nothing it printed may be hidden, and a sequence cut
between two chunks is judged as if it came whole."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from taskpool._terminal import (
    MAX_SEQUENCE,
    Neutraliser,
    Scanner,
    escape_field,
    neutralise,
    sgr_codes,
)

ESC = "\x1b"
#: What a terminal would obey: ESC, the C1 controls, and every C0 control but
#: newline and tab (a carriage return included: it hides what came before it).
OBEYED = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_cursor_movement_and_erasing_are_shown_not_obeyed() -> None:
    """The reported attack: up one line, erase it."""
    assert neutralise("a\x1b[1A\x1b[2Kb\n") == "a\\x1b[1A\\x1b[2Kb\n"


def test_osc_title_clipboard_and_hyperlinks_are_shown_not_obeyed() -> None:
    for sequence in (
        "\x1b]0;pwned\x07",  # window title, BEL-terminated
        "\x1b]2;pwned\x1b\\",  # title, ST-terminated
        "\x1b]52;c;cm0gLXJmIC8K\x07",  # write the clipboard
        "\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\",  # hyperlink
        "\x9d0;pwned\x9c",  # 8-bit OSC and ST
        "\x1bP+q544e\x1b\\",  # DCS (a terminfo query)
        "\x1b_private\x1b\\",  # APC
    ):
        shown = neutralise("x" + sequence + "y")
        assert not OBEYED.search(shown), repr(shown)
        assert shown.startswith("x")
        assert shown.endswith("y")


def test_every_other_escape_and_control_is_visible() -> None:
    assert neutralise("\x1bc") == "\\x1bc"  # full reset
    assert neutralise("\x1b(0") == "\\x1b(0"  # line-drawing charset
    assert neutralise("\x9b2J") == "\\x9b2J"  # 8-bit CSI: clear the screen
    assert neutralise("bell\x07 bs\x08 nul\x00 del\x7f") == "bell\\x07 bs\\x08 nul\\x00 del\\x7f"
    assert neutralise("\x1b[?1049h") == "\\x1b[?1049h"  # alternate screen


def test_a_carriage_return_becomes_a_newline_and_hides_nothing() -> None:
    """`ERROR\\rOK   ` would show only `OK` on a terminal."""
    assert neutralise("ERROR: disk\rOK         \r\nnext\r\n") == "ERROR: disk\nOK         \nnext\n"


def test_colours_are_dropped_unless_kept_and_then_reset_at_the_end() -> None:
    text = "\x1b[1;31mred\x1b[0m plain \x1b[38;5;196mstill red"
    assert neutralise(text) == "red plain still red"
    kept = neutralise(text, keep_sgr=True)
    assert kept == text + "\x1b[0m"
    assert neutralise("\x1b[32mok\x1b[0m", keep_sgr=True) == "\x1b[32mok\x1b[0m"  # no second reset


def test_concealed_text_is_never_concealed() -> None:
    assert neutralise("\x1b[8msecret\x1b[0m", keep_sgr=True) == "secret\x1b[0m"
    assert neutralise("\x1b[38;5;8mgrey", keep_sgr=True) == "\x1b[38;5;8mgrey\x1b[0m"


def test_sequences_cut_between_chunks_are_judged_whole() -> None:
    """`logs -f` gets output in pieces; a cut must change nothing."""
    text = "a\x1b[1;31mb\x1b]0;title\x07c\r\nd\re\x1b[2Kf"
    whole = neutralise(text, keep_sgr=True)
    for cut in range(len(text) + 1):
        out = Neutraliser(keep_sgr=True)
        assert out.feed(text[:cut]) + out.feed(text[cut:]) + out.flush() == whole, cut


@given(st.text(alphabet=st.sampled_from("ab\n\r\x1b[]0;1m\x07\\\x9b\x9dP?7hJ"), max_size=60))
def test_no_input_gets_anything_obeyed_through(text: str) -> None:
    """Whatever the bytes, in whatever pieces: nothing obeyed but kept colours."""
    for keep in (False, True):
        out = Neutraliser(keep_sgr=keep)
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
        shown = "".join(out.feed(p) for p in pieces) + out.flush()
        without_colours = re.sub(r"\x1b\[[0-9;:]*m", "", shown) if keep else shown
        assert not OBEYED.search(without_colours), repr(shown)
        # Nothing printable is lost: every letter of the input is still there.
        assert shown.count("a") >= text.count("a")
        assert shown.count("b") >= text.count("b")


def test_an_unterminated_sequence_swallows_nothing() -> None:
    """An OSC never closed: held back only up to MAX_SEQUENCE, then shown as text."""
    out = Neutraliser()
    shown = out.feed("\x1b]0;" + "x" * (MAX_SEQUENCE + 10) + "\nafter\n")
    assert shown.endswith("\nafter\n")
    assert shown.startswith("\\x1b]0;xxx")
    held = Neutraliser()
    assert held.feed("before\x1b]0;title") == "before"  # may still end in the next chunk
    assert held.flush() == "\\x1b]0;title"  # it never did: shown


def test_a_malformed_csi_is_cut_where_it_broke() -> None:
    assert neutralise("\x1b[12\nrest") == "\\x1b[12\nrest"
    assert neutralise("\x1b\x1b[2J") == "\\x1b\\x1b[2J"


def test_scanner_segments_keep_the_source_text() -> None:
    """The renderers' shared parse: every segment as it came, in order."""
    text = "a\x1b[31mb\x1b[2Kc\x1b]0;t\x07"
    scanner = Scanner()
    segments = scanner.feed(text) + scanner.flush()
    assert "".join(s.text for s in segments) == text
    assert [(s.kind, s.params) for s in segments if s.kind != "text"] == [
        ("sgr", "31"),
        ("control", "2"),
        ("control", ""),
    ]


def test_sgr_codes_group_extended_colours() -> None:
    assert sgr_codes("") == [(0,)]
    assert sgr_codes("1;31") == [(1,), (31,)]
    assert sgr_codes("38;5;196;48;2;1;2;3;4") == [(38, 5, 196), (48, 2, 1, 2, 3), (4,)]
    assert sgr_codes("38:2::10:20:30;4:3") == [(38, 2, 10, 20, 30), (4, 3)]
    assert sgr_codes("38;5") == [(38,), (5,)]  # cut short: the codes alone


def test_fields_are_one_line_with_nothing_invisible() -> None:
    assert escape_field("plain name") == "plain name"
    assert escape_field("two\nlines\ttab\r") == "two\\nlines\\ttab\\r"
    assert escape_field("a\x1b]0;t\x07b") == "a\\x1b]0;t\\x07b"
    assert escape_field("\u202eexe.txt") == "\\u202eexe.txt"  # right-to-left override
    assert escape_field("zero\u200bwidth") == "zero\\u200bwidth"
    assert escape_field("caf\u00e9 \u6771\u4eac") == "caf\u00e9 \u6771\u4eac"  # letters stay
