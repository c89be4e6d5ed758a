"""Text from tasks made safe for an operator's terminal. Pure.

A task's output, argv and names are the task's words, not taskpool's: printed raw, a
task writing `ESC[1A ESC[2K` erases the operator's previous line, an OSC sequence sets
the terminal's title or clipboard, a lone carriage return hides what came before it on
the line. Here every control sequence is split out (`Scanner`, incremental, so a
sequence cut between two chunks of a followed log is still one sequence) and
rendered inert and visible (`\\x1b[1A`), except:

- colours and styles (SGR, `ESC[...m`), kept only when asked (`keep_sgr`: the CLI
  keeps them when its stdout is a terminal) and then closed by a reset at the end;
  one that conceals text (SGR 8) is dropped;
- newlines and tabs; a carriage return becomes a newline (a progress bar's updates
  show as lines; nothing the task printed is hidden).

`escape_field` is the single-line form for argv items and names: newlines, tabs, and
Unicode's invisible formatting characters (bidirectional overrides among them) are
escaped too. `Scanner` and `sgr_codes` are the parsing; what renders it (here for a
terminal; an HTML renderer can take the same segments) stays apart.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal, NamedTuple

#: The longest sequence held back waiting for its end; past it, its introducer is
#: shown as text and scanning goes on after it (an unterminated OSC swallows nothing).
MAX_SEQUENCE = 4096

#: A character that starts something other than plain text: C0 controls but tab and
#: newline, DEL, and the C1 controls (which some terminals obey as ESC + a letter).
_SPECIAL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CSI = re.compile(r"(?:\x1b\[|\x9b)([0-?]*)([ -/]*)([@-~])")
_CSI_PART = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*")
#: OSC, DCS, SOS, PM, APC: a string up to BEL or ST (or CAN/SUB, which abort it).
_STRING_START = re.compile(r"\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]")
_STRING_END = re.compile(r"\x07|\x1b\\|\x9c|\x18|\x1a")
_ESCAPE = re.compile(r"\x1b[ -/]*[0-~]")
_ESCAPE_PART = re.compile(r"\x1b[ -/]*")
_SGR_PARAMS = re.compile(r"[0-9;:]*")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Segment(NamedTuple):
    """A piece of scanned text, as it came: `text` (plain text), `sgr` (colours and
    styles; `params` is what stands between `ESC[` and `m`), or `control` (anything
    else a terminal would obey)."""

    kind: Literal["text", "sgr", "control"]
    text: str
    params: str = ""


class Scanner:
    """Splits text fed in chunks into segments; a sequence cut at a chunk's end is
    held until the next chunk (or `flush`) completes it."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[Segment]:
        data = self._pending + text
        segments, self._pending = _scan(data, final=False)
        return segments

    def flush(self) -> list[Segment]:
        """The held-back rest, as control (it never completed)."""
        segments, _ = _scan(self._pending, final=True)
        self._pending = ""
        return segments


def _scan(data: str, *, final: bool) -> tuple[list[Segment], str]:
    """Segments of `data`, and the incomplete tail to hold back (none when `final`)."""
    segments: list[Segment] = []
    pos = 0
    while pos < len(data):
        special = _SPECIAL.search(data, pos)
        if special is None:
            segments.append(Segment("text", data[pos:]))
            break
        if special.start() > pos:
            segments.append(Segment("text", data[pos : special.start()]))
        pos = special.start()
        found = _sequence_at(data, pos)
        if found is None:  # incomplete: wait for more, unless there is no more or too much
            if not final and len(data) - pos <= MAX_SEQUENCE:
                return segments, data[pos:]
            found = Segment("control", data[pos]), pos + 1
        segment, pos = found
        segments.append(segment)
    return segments, ""


def _sequence_at(data: str, pos: int) -> tuple[Segment, int] | None:
    """The sequence starting at `pos` (a special character) and where it ends; None
    when `data` ends before it does."""
    char = data[pos]
    nxt = data[pos + 1] if pos + 1 < len(data) else ""
    if char == "\r":
        if not nxt:
            return None  # a \n may follow in the next chunk
        end = pos + 2 if nxt == "\n" else pos + 1
        return Segment("control", data[pos:end]), end
    if char == "\x9b" or (char == "\x1b" and nxt == "["):
        csi = _CSI.match(data, pos)
        if csi is not None:
            params, intermediates, final_byte = csi.groups()
            is_sgr = final_byte == "m" and not intermediates and _SGR_PARAMS.fullmatch(params)
            return Segment("sgr" if is_sgr else "control", csi.group(), params), csi.end()
        part = _CSI_PART.match(data, pos)
        assert part is not None
        if part.end() == len(data):
            return None
        return Segment("control", part.group()), part.end()  # malformed: cut where it broke
    if _STRING_START.match(data, pos):
        start = pos + (2 if char == "\x1b" else 1)
        terminator = _STRING_END.search(data, start, start + MAX_SEQUENCE)
        if terminator is None:
            return None
        return Segment("control", data[pos : terminator.end()]), terminator.end()
    if char == "\x1b":
        escape = _ESCAPE.match(data, pos)
        if escape is not None:
            return Segment("control", escape.group()), escape.end()
        part = _ESCAPE_PART.match(data, pos)
        assert part is not None
        if part.end() == len(data):
            return None
        return Segment("control", part.group()), part.end()
    return Segment("control", char), pos + 1


def sgr_codes(params: str) -> list[tuple[int, ...]]:
    """An SGR parameter string as attributes: `(1,)` bold, `(31,)` red, `(38, 5, n)` a
    palette colour, `(38, 2, r, g, b)` a true colour (also 48 background, 58
    underline); `(0,)` for an empty string (a reset). Colon-separated forms
    (`38:2::r:g:b`, `4:3`) are one attribute each, the colour space id dropped."""
    codes: list[tuple[int, ...]] = []
    fields = params.split(";")
    i = 0
    while i < len(fields):
        field = fields[i]
        if ":" in field:
            parts = [int(p) if p.isdigit() else 0 for p in field.split(":")]
            if parts[0] in (38, 48, 58) and parts[1:2] == [2] and len(parts) == 6:
                parts = [parts[0], 2, *parts[3:]]  # 38:2:<colour space>:r:g:b
            codes.append(tuple(parts))
            i += 1
            continue
        code = int(field) if field.isdigit() else 0
        mode = fields[i + 1] if i + 1 < len(fields) else ""
        width = {"5": 3, "2": 5}.get(mode, 1) if code in (38, 48, 58) else 1
        if i + width > len(fields):
            width = 1  # an extended colour cut short: the code alone
        codes.append((code, *(int(f) if f.isdigit() else 0 for f in fields[i + 1 : i + width])))
        i += width
    return codes


def visible(text: str) -> str:
    """Every control character of `text` as `\\xNN`: shown, never obeyed."""
    return _CONTROL_CHAR.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Neutraliser:
    """A task's output, chunk by chunk, made safe for a terminal (see the module)."""

    def __init__(self, *, keep_sgr: bool = False) -> None:
        self.keep_sgr = keep_sgr
        self._scanner = Scanner()
        self._styled = False  # a colour or style is on: reset at the end

    def feed(self, text: str) -> str:
        return self._render(self._scanner.feed(text))

    def flush(self) -> str:
        """What was held back, and the reset that closes any colour left on."""
        rest = self._render(self._scanner.flush())
        if self._styled:
            self._styled = False
            rest += "\x1b[0m"
        return rest

    def _render(self, segments: list[Segment]) -> str:
        out: list[str] = []
        for segment in segments:
            if segment.kind == "text":
                out.append(segment.text)
            elif segment.kind == "sgr":
                codes = sgr_codes(segment.params)
                if self.keep_sgr and (8,) not in codes:
                    out.append("\x1b[" + segment.params + "m")
                    self._styled = codes != [(0,)]  # anything but a reset stays on
            elif segment.text in ("\r", "\r\n"):
                out.append("\n")
            else:
                out.append(visible(segment.text))
        return "".join(out)


def neutralise(text: str, *, keep_sgr: bool = False) -> str:
    """The whole of `text` made safe for a terminal (see the module)."""
    neutraliser = Neutraliser(keep_sgr=keep_sgr)
    return neutraliser.feed(text) + neutraliser.flush()


_FIELD_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _field_char(char: str) -> str:
    if char in _FIELD_ESCAPES:
        return _FIELD_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_field(text: str) -> str:
    """A one-line field (an argv item, a name, a path) safe to print: every control
    character, line separator and invisible formatting character (bidirectional
    overrides, zero-width characters) escaped."""
    if text.isprintable():  # the common case; isprintable is False for all of those
        return text
    return "".join(
        _field_char(c) if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text
    )
