"""Hostile output: NUL bytes, invalid UTF-8, endless lines and floods are stored as
valid text, capped per attempt, with bounded memory, and never crash a runner."""

from __future__ import annotations

import sys

import anyio
import psutil
import pytest

from taskpool import Status
from tests.helpers import fast_pool, open_store

MiB = 1024 * 1024


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_nul_bytes_and_invalid_utf8_become_visible_replacements(database: str) -> None:
    """NUL and undecodable bytes are stored as U+FFFD; valid text around them is kept."""
    code = r"import sys; sys.stdout.buffer.write(b'a\x00b\xff\xfec \xc3\xa9 \xe2\x82\n')"
    async with fast_pool(database) as pool:
        task = await pool.submit(_python(code))
        assert (await pool.wait(task)).status is Status.SUCCEEDED
        assert await pool.output(task) == "a\ufffdb\ufffd\ufffdc \u00e9 \ufffd\n"


async def test_a_10_mb_line_without_newline_is_stored_in_bounded_chunks(database: str) -> None:
    """An endless line is split into bounded chunks and stored whole when under the cap."""
    size = 10 * 1000 * 1000
    code = f"import sys; sys.stdout.write('x' * {size}); sys.stdout.flush()"
    async with fast_pool(database, max_log_bytes=16 * MiB) as pool:
        task = await pool.submit(_python(code))
        assert (await pool.wait(task)).status is Status.SUCCEEDED
        text = await pool.output(task)
    assert len(text) == size
    assert set(text) == {"x"}
    async with open_store(database) as store:
        chunks = await store.read_output(task, limit=100_000)
    assert len(chunks) > 1
    assert max(len(c.text) for c in chunks) <= 64 * 1024


@pytest.mark.slow
async def test_200_mb_flood_keeps_the_cap_and_memory_bounded(database: str) -> None:
    """200 MB of mixed hostile output: the task succeeds, the log stops at the cap with a
    marker saying how much was cut, and the pool's memory does not follow the flood."""
    block_size, blocks = 1000 * 1000, 200
    total = block_size * blocks
    line = b"hostile \xff line \x00\n"
    flood = _python(
        f"import sys; b = ({line!r} * {block_size // len(line) + 1})[:{block_size}]\n"
        f"for _ in range({blocks}): sys.stdout.buffer.write(b)"
    )
    cap = 10 * MiB
    me = psutil.Process()
    baseline = me.memory_info().rss
    peak = baseline

    async with fast_pool(database, max_log_bytes=cap) as pool:
        task = await pool.submit(flood)
        with anyio.fail_after(120):
            while not (info := await pool.get(task)).is_terminal:
                peak = max(peak, me.memory_info().rss)
                await anyio.sleep(0.01)
        assert info.status is Status.SUCCEEDED, info.reason
        text = await pool.output(task)

    marker = f"\n[taskpool: output cut at {cap} bytes; {total - cap} more bytes discarded]\n"
    assert text.endswith(marker)
    block = (line * (block_size // len(line) + 1))[:block_size]
    kept = (block * (cap // block_size + 1))[:cap]  # exactly the first `cap` bytes
    assert text[: -len(marker)] == kept.decode("utf-8", "replace").replace("\x00", "\ufffd")
    assert "\x00" not in text
    # 200 MB went through; the pool may hold the cap's worth of text, never the flood.
    assert peak - baseline < 4 * cap, f"RSS grew by {(peak - baseline) / MiB:.0f} MiB"
