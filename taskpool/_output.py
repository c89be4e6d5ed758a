"""Turning a child's raw output into storable text, with bounded memory. Pure."""

from __future__ import annotations

import codecs

REPLACEMENT = "\ufffd"


class OutputDecoder:
    """Decode a byte stream of unknown quality into text safe for any database.

    Invalid UTF-8 becomes U+FFFD, and so does NUL (no SQL text column stores it).
    Chunks keep the reader's size, so an endless line without a newline is stored
    as a run of bounded chunks. Past `max_bytes` of input, text is dropped but
    counted, and `finish` appends a marker that says how much was cut.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_seen = 0
        self.bytes_dropped = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Return the storable text for `data` ('' once the cap is reached)."""
        room = self.max_bytes - self.bytes_seen
        self.bytes_seen += len(data)
        if room <= 0:
            self.bytes_dropped += len(data)
            return ""
        if len(data) > room:
            self.bytes_dropped += len(data) - room
            data = data[:room]
        return self._decoder.decode(data).replace("\x00", REPLACEMENT)

    def finish(self) -> str:
        """Flush a trailing partial character and add the truncation marker if needed."""
        tail = self._decoder.decode(b"", final=True).replace("\x00", REPLACEMENT)
        if self.bytes_dropped:
            tail += (
                f"\n[taskpool: output cut at {self.max_bytes} bytes; "
                f"{self.bytes_dropped} more bytes discarded]\n"
            )
        return tail
