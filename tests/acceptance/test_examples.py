"""The examples run for real: the quickstart, terraform and ansible runs (the ASGI app's
tests, over real HTTP, are in test_asgi_client.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_quickstart_reports_every_outcome() -> None:
    """The README's first command: each bad case ends as it should, with its reason."""
    result = run_example("quickstart.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "succeeded: exited with code 0",
        "failed: killed by SIGSEGV",
        "timed_out: timed out after 1 s; process group sent SIGTERM",
        "stalled: no output for 1 s; process group sent SIGTERM",
        "failed: could not start 'no-such-program': No such file or directory",
        "output: trying | trying | trying",
        "output: deploying again",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_real_terraform_and_ansible_runs() -> None:
    """terraform init and apply (one template, one state lock, apply after init's
    success) and an ansible playbook."""
    result = run_example("infra_runs.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== terraform init (task 1): succeeded, exited with code 0" in out
    assert "== terraform apply (task 2, after 1): succeeded, exited with code 0" in out
    assert 'greeting = "hello from terraform"' in out
    assert "== ansible playbook (task 3): succeeded, exited with code 0" in out
    assert '"msg": "hello from ansible"' in out
    assert "ok=3" in out
