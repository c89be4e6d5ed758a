"""The README opens with the two commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _opening_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)[:2]


def test_readme_opens_with_run_and_test_commands() -> None:
    """The first two code blocks install and run the example, then install and run the tests."""
    run, test = _opening_commands()
    assert "examples/quickstart.py" in run
    assert "pytest" in test


def test_ci_runs_the_readme_test_command() -> None:
    """`.ci/run` calls the README's test command verbatim, so the two cannot drift apart."""
    _, test = _opening_commands()
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
