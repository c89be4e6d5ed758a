"""The command line names stores through the one `open_store`: a URL it does not know
is an error, never a file of that name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_refuses_a_store_url_it_does_not_know(tmp_path: Path) -> None:
    """`--db mysql://...` exits 1 naming the scheme, shows no password, creates nothing."""
    for command in (["ls"], ["submit", "--", "true"]):
        result = subprocess.run(
            [sys.executable, "-m", "taskpool", "--db", "mysql://me:hunter2@db/x", *command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert "unknown store URL scheme 'mysql'" in result.stderr
        assert "hunter2" not in result.stderr
    assert list(tmp_path.iterdir()) == []
