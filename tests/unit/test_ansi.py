"""The dashboard's ANSI to HTML renderer: colours shown, everything else neutralised."""

from __future__ import annotations

import html
import re

from hypothesis import given
from hypothesis import strategies as st

from taskpool.web._ansi import MAX_SEQUENCE_CHARS, PLAIN, AnsiRenderer, Style, apply_sgr, render

TAG = re.compile(r'<span(?: class="[a-z0-9 -]+")?(?: style="[a-z:#0-9;]+")?>|</span>')


def visible(markup: str) -> str:
    """The text a browser shows for the renderer's markup."""
    return html.unescape(TAG.sub("", markup))


def only_our_markup(markup: str) -> bool:
    """No tag but the renderer's own spans, and no control character but \\t and \\n."""
    rest = TAG.sub("", markup)
    return (
        "<" not in rest
        and ">" not in rest
        and not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", rest)
    )


def test_colours_become_classes_and_reset_closes_them() -> None:
    assert render("\x1b[1;31merror\x1b[0m: plain") == '<span class="a-b a-f1">error</span>: plain'
    assert render("\x1b[92mok\x1b[39m") == '<span class="a-f10">ok</span>'
    assert render("\x1b[44mbg\x1b[49m") == '<span class="a-g4">bg</span>'
    assert render("\x1b[mx") == "x"  # an empty SGR is a reset


def test_256_and_true_colours_become_inline_hex_made_here() -> None:
    assert render("\x1b[38;5;196mx") == '<span style="color:#ff0000">x</span>'
    assert render("\x1b[38;5;3mx") == '<span class="a-f3">x</span>'
    assert render("\x1b[48;5;232mx") == '<span style="background:#080808">x</span>'
    assert render("\x1b[38;2;1;2;3mx") == '<span style="color:#010203">x</span>'
    assert render("\x1b[38:2:10:20:30mx") == '<span style="color:#0a141e">x</span>'


def test_out_of_range_and_malformed_sgr_change_nothing() -> None:
    assert render("\x1b[38;2;999;0;0mx") == "x"
    assert render("\x1b[38;5;300mx") == "x"
    assert render("\x1b[38mx") == "x"
    assert render("\x1b[99999999mx") == "x"
    assert apply_sgr(PLAIN, "1;" * 10_000 + "31") == Style(bold=True)  # params past the cap


def test_markup_in_output_is_escaped() -> None:
    out = render("<script>alert(\"x\")</script> & 'q'")
    assert out == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;"


def test_cursor_moves_erases_and_other_csi_are_dropped() -> None:
    hostile = "keep\x1b[1A\x1b[2K\x1b[2J\x1b[H\x1b[10;20H\x1b[?25l\x1b[6n\x1b[5S\x1b[?1049h line"
    assert render(hostile) == "keep line"


def test_osc_title_hyperlinks_and_string_sequences_are_dropped() -> None:
    assert render("a\x1b]0;pwned title\x07b") == "ab"
    assert render("a\x1b]2;title\x1b\\b") == "ab"
    assert render("\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\") == "link"
    assert render("a\x1bPq#0;2;0;0;0\x1b\\b") == "ab"  # DCS (sixel)
    assert render("a\x1b_apc\x1b\\b\x1b^pm\x1b\\c") == "abc"
    assert render("a\x1bcb\x1b7c\x1b8d\x1b(Be") == "abcde"  # reset, save/restore, charset


def test_c1_controls_and_8bit_introducers_are_dropped() -> None:
    assert render("a\x9b31mb\x9d0;t\x9cc\x85d") == "a" + '<span class="a-f1">b</span>' + (
        '<span class="a-f1">c</span><span class="a-f1">d</span>'
    )


def test_c0_controls_are_dropped_but_tabs_and_newlines_kept() -> None:
    assert render("a\x00b\x07c\x08d\x7fe\tf\ng") == "abcde\tf\ng"


def test_carriage_returns_become_newlines_once() -> None:
    assert render("one\r\ntwo\rthree\r") == "one\ntwo\nthree\n"
    renderer = AnsiRenderer()
    assert renderer.feed("10%\r") == "10%"  # held: a \n may follow
    assert renderer.feed("\n20%") == "\n20%"
    assert renderer.feed("\r") + renderer.feed("30%") == "\n30%"


def test_a_sequence_cut_between_chunks_is_held_until_it_ends() -> None:
    renderer = AnsiRenderer()
    parts = [renderer.feed(chunk) for chunk in ("a\x1b", "[3", "1", "mred\x1b]0;ti", "tle\x07.")]
    assert (
        "".join(parts) + renderer.finish()
        == 'a<span class="a-f1">red</span><span class="a-f1">.</span>'
    )


def test_the_style_carries_over_chunks_and_every_chunk_is_balanced() -> None:
    renderer = AnsiRenderer()
    first = renderer.feed("\x1b[33mwarn")
    second = renderer.feed("ing\n")
    assert first == '<span class="a-f3">warn</span>'
    assert second == '<span class="a-f3">ing\n</span>'


def test_an_unterminated_sequence_is_given_up_and_never_buffers_for_ever() -> None:
    renderer = AnsiRenderer()
    shown = renderer.feed("\x1b]0;" + "t" * (MAX_SEQUENCE_CHARS + 10))
    assert shown.startswith("]0;ttt")  # its ESC dropped, the rest shown as text
    assert renderer.finish() == ""
    held = AnsiRenderer()
    assert held.feed("x\x1b]0;never ends") == "x"
    assert held.finish() == "]0;never ends"  # at the end, shown as text, without ESC


def test_invalid_utf8_and_lone_surrogates_become_replacement_characters() -> None:
    decoded = b"ok \xff\xfe \xed\xa0\x80 end".decode("utf-8", errors="replace")
    assert render(decoded) == decoded
    assert render("a\udcffb") == "a\ufffdb"  # from surrogateescape: never unencodable
    render("a\udcffb").encode("utf-8")


def test_a_huge_line_renders_whole_and_in_linear_time() -> None:
    line = "x" * 5_000_000
    assert render(line) == line
    many = "\x1b[31mr\x1b[0m" * 100_000
    assert visible(render(many)) == "r" * 100_000
    junk = "\x1b]" * 200_000  # many unterminated OSC starts: bounded scans, not quadratic
    assert only_our_markup(render(junk))


hostile_alphabet = st.sampled_from(
    [
        *("\x1b", "[", "]", "m", ";", "3", "1", "\x07", "\\", "\r", "\n", "\x9b", "\x9c", "P"),
        *("<", "&", "a", "\x00", "\x08", "\ud800", "é", "0", "?", "H", "J", "K", "2", "5"),
        *("8", ":"),
    ]
)


@given(st.lists(hostile_alphabet, max_size=200).map("".join))
def test_any_input_gives_only_our_markup(text: str) -> None:
    out = render(text)
    assert only_our_markup(out), repr(out)
    out.encode("utf-8")


@given(st.lists(hostile_alphabet, max_size=120).map("".join), st.data())
def test_chunking_never_changes_what_is_shown(text: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    renderer = AnsiRenderer()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    chunked = "".join(renderer.feed(piece) for piece in pieces) + renderer.finish()
    assert visible(chunked) == visible(render(text))
