"""Task output to safe HTML: ANSI colours kept, every other control sequence dropped.

A task's output is whatever its program printed, and programs print for terminals:
colours (SGR), but also cursor moves, line erases, title sets (OSC), device queries.
A browser must show the colours and nothing else can be let through: no markup, no
sequence. `AnsiRenderer` is fed the output chunk by chunk, as it streams, and turns
each chunk into balanced HTML that can be appended to the page as is. A sequence cut
between two chunks is held until its end arrives (bounded: a sequence that never ends
is given up and shown as text, so a hostile stream cannot make it buffer for ever).
Pure: no I/O.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, replace

#: The longest control sequence held while waiting for its end; past it the opening
#: ESC is dropped and the rest shown as plain text. OSC hyperlinks and titles fit.
MAX_SEQUENCE_CHARS = 4096
#: SGR parameters looked at in one sequence (`ESC[1;1;1;...m` costs no more).
MAX_SGR_PARAMS = 32

# One complete sequence, each part bounded so that a scan never goes quadratic.
_SEQUENCE = re.compile(
    r"""
      (?:\x1b\[|\x9b) (?P<params>[0-?]{0,64}) [ -/]{0,16} (?P<final>[@-~])  # CSI
    | (?:\x1b\]|\x9d) [^\x07\x1b\x9c]{0,4096} (?:\x07|\x1b\\|\x9c)       # OSC
    | (?:\x1b[PX^_]|[\x90\x98\x9e\x9f]) [^\x1b\x9c]{0,4096} (?:\x1b\\|\x9c)  # DCS, SOS, PM, APC
    | \x1b (?![\[\]PX^_]) [ -/]{0,16} [0-~]                         # any other escape
    """,
    re.VERBOSE,
)
# The start of a sequence that may still be completed by the next chunk.
_PARTIAL = re.compile(
    r"""
      (?:\x1b\[|\x9b) [0-?]{0,64} [ -/]{0,16}
    | (?:\x1b\]|\x9d) [^\x07\x1b\x9c]{0,4096} \x1b?
    | (?:\x1b[PX^_]|[\x90\x98\x9e\x9f]) [^\x1b\x9c]{0,4096} \x1b?
    | \x1b [ -/]{0,16}
    """,
    re.VERBOSE,
)
# Characters that are not shown as text: C0 controls but tab and newline, DEL, C1.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_INTRODUCERS = "\x1b\x90\x98\x9b\x9d\x9e\x9f"


@dataclass(frozen=True, slots=True)
class Style:
    """The SGR attributes in force. A colour is an index 0-15 (a CSS class, so the
    palette follows the page's theme) or `#rrggbb` (256-colour and true colour)."""

    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False
    strike: bool = False
    inverse: bool = False
    fg: int | str | None = None
    bg: int | str | None = None

    def opening_tag(self) -> str | None:
        """The `<span>` that shows this style, or None for plain text."""
        classes = [
            name
            for name, on in (
                ("a-b", self.bold),
                ("a-d", self.dim),
                ("a-i", self.italic),
                ("a-u", self.underline),
                ("a-s", self.strike),
                ("a-inv", self.inverse),
            )
            if on
        ]
        styles = []
        for prefix, prop, colour in (("a-f", "color", self.fg), ("a-g", "background", self.bg)):
            if isinstance(colour, int):
                classes.append(f"{prefix}{colour}")
            elif isinstance(colour, str):  # made here from numbers: always #rrggbb
                styles.append(f"{prop}:{colour}")
        if not classes and not styles:
            return None
        attrs = f' class="{" ".join(classes)}"' if classes else ""
        if styles:
            attrs += f' style="{";".join(styles)}"'
        return f"<span{attrs}>"


PLAIN = Style()


def _colour_256(n: int) -> int | str:
    """An xterm 256-colour index as a palette index or `#rrggbb`."""
    if n < 16:
        return n
    if n < 232:
        n -= 16
        levels = [0 if c == 0 else 55 + 40 * c for c in (n // 36, n // 6 % 6, n % 6)]
        return "#{:02x}{:02x}{:02x}".format(*levels)
    grey = 8 + 10 * (n - 232)
    return f"#{grey:02x}{grey:02x}{grey:02x}"


def apply_sgr(style: Style, params: str) -> Style:
    """The style after one `ESC[<params>m` (pure). Unknown codes change nothing."""
    codes = []
    for part in params.replace(":", ";").split(";")[:MAX_SGR_PARAMS]:
        codes.append(int(part) if part.isdigit() and len(part) <= 4 else 0 if not part else -1)
    if not codes:
        codes = [0]
    i = 0
    while i < len(codes):
        code = codes[i]
        i += 1
        if code == 0:
            style = PLAIN
        elif code in _FLAGS_ON:
            style = replace(style, **{_FLAGS_ON[code]: True})
        elif code in _FLAGS_OFF:
            style = replace(style, **dict.fromkeys(_FLAGS_OFF[code], False))
        elif 30 <= code <= 37 or 90 <= code <= 97:
            style = replace(style, fg=code - 30 if code < 90 else code - 82)
        elif 40 <= code <= 47 or 100 <= code <= 107:
            style = replace(style, bg=code - 40 if code < 100 else code - 92)
        elif code == 39:
            style = replace(style, fg=None)
        elif code == 49:
            style = replace(style, bg=None)
        elif code in (38, 48):
            colour, i = _extended_colour(codes, i)
            if colour is not None and code == 38:
                style = replace(style, fg=colour)
            elif colour is not None:
                style = replace(style, bg=colour)
    return style


_FLAGS_ON = {1: "bold", 2: "dim", 3: "italic", 4: "underline", 7: "inverse", 9: "strike"}
_FLAGS_OFF = {
    22: ("bold", "dim"),
    23: ("italic",),
    24: ("underline",),
    27: ("inverse",),
    29: ("strike",),
}


def _extended_colour(codes: list[int], i: int) -> tuple[int | str | None, int]:
    """`5;n` or `2;r;g;b` after a 38/48, and where the codes go on after it."""
    if i < len(codes) and codes[i] == 5 and i + 1 < len(codes):
        n = codes[i + 1]
        return (_colour_256(n) if 0 <= n <= 255 else None), i + 2
    if i < len(codes) and codes[i] == 2 and i + 3 < len(codes):
        rgb = codes[i + 1 : i + 4]
        if all(0 <= c <= 255 for c in rgb):
            return "#{:02x}{:02x}{:02x}".format(*rgb), i + 4
        return None, i + 4
    return None, len(codes)  # malformed: ignore the rest of the sequence


class AnsiRenderer:
    """Feed output text in chunks; get HTML for each, balanced and safe to append.

    The style carries over from chunk to chunk, and so does a sequence cut in two.
    `\\r\\n` and a lone `\\r` become a newline (a progress bar shows as lines rather
    than overwriting them: a page cannot take back what it has shown); tab and newline
    are kept; every other control character and sequence is dropped, SGR excepted.
    """

    def __init__(self) -> None:
        self.style = PLAIN
        self._pending = ""

    def feed(self, text: str) -> str:
        return self._render(self._pending + text, final=False)

    def finish(self) -> str:
        """What is left when the output has ended: a held sequence is shown as text."""
        return self._render(self._pending, final=True)

    def _render(self, text: str, *, final: bool) -> str:
        self._pending = ""
        out: list[str] = []
        pos = 0
        while pos < len(text):
            found = _CONTROL.search(text, pos)
            if found is None:
                self._text(out, text[pos:])
                break
            start = found.start()
            self._text(out, text[pos:start])
            char = text[start]
            pos = start + 1
            if char == "\r":
                if start + 1 == len(text) and not final:
                    self._pending = "\r"  # a \n may follow in the next chunk
                    break
                if text.startswith("\n", start + 1):
                    continue  # the \n that follows is the newline
                out.append("\n")
            elif char in _INTRODUCERS:
                sequence = _SEQUENCE.match(text, start)
                if sequence is not None:
                    if sequence["final"] == "m":  # SGR; any other CSI is dropped
                        self.style = apply_sgr(self.style, sequence["params"] or "")
                    pos = sequence.end()
                elif not final and _PARTIAL.fullmatch(text, start) is not None:
                    self._pending = text[start:]
                    break
                # else: a broken sequence; its introducer alone is dropped
        return "".join(out)

    def _text(self, out: list[str], text: str) -> None:
        if not text:
            return
        shown = html.escape(_SURROGATE.sub("\ufffd", text), quote=True)
        tag = self.style.opening_tag()
        out.append(shown if tag is None else f"{tag}{shown}</span>")


def render(text: str) -> str:
    """All of `text` as HTML in one go."""
    renderer = AnsiRenderer()
    return renderer.feed(text) + renderer.finish()
