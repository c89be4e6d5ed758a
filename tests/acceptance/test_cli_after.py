"""`taskpool submit --after`, and what `show`, `why` and `ls` say of a held task."""

from __future__ import annotations

from tests.acceptance.test_cli import cli, cli_json


def test_submit_after_holds_the_task_and_show_says_what_for(database: str) -> None:
    """A task submitted `--after` another is held; show and why name the dependency,
    show --json and ls --json carry `after`, and nothing prints an infinite time."""
    init = cli(database, "submit", "--", "terraform", "init").stdout.strip()
    other = cli(database, "submit", "--", "true").stdout.strip()
    apply = cli(
        database, "submit", "--after", init, "--after", other, "--after", init, "--", "apply"
    ).stdout.strip()
    shown = cli(database, "show", apply).stdout
    assert f"  after: {init}, {other}" in shown
    assert f"waiting for dependency {init} (waiting); waiting for dependency {other}" in shown
    assert "inf" not in shown
    why = cli(database, "why", apply).stdout
    assert why == (
        f"task {apply} is waiting:\n"
        f"  waiting for dependency {init} (waiting)\n"
        f"  waiting for dependency {other} (waiting)\n"
    )
    task = cli_json(database, "show", apply)["task"]
    assert task["spec"]["after"] == [int(init), int(other)]
    assert task["spec"]["not_before"] is None
    listed = {t["id"]: t for t in cli_json(database, "ls")}
    assert listed[int(apply)]["spec"]["after"] == [int(init), int(other)]


def test_submit_after_a_task_that_does_not_exist_is_refused(database: str) -> None:
    """`--after` naming no task exits non-zero, says which, and stores nothing."""
    cli(database, "submit", "--", "true")
    refused = cli(database, "submit", "--after", "999999", "--", "true", check=False)
    assert refused.returncode == 1
    assert "--after names no existing task: 999999" in refused.stderr
    assert refused.stdout == ""
    assert len(cli_json(database, "ls")) == 1
    bad = cli(database, "submit", "--after", "x", "--", "true", check=False)
    assert bad.returncode == 2
    assert "--after" in bad.stderr


def test_cancelling_a_dependency_cancels_the_dependant_with_its_reason(database: str) -> None:
    """`cancel` of a waiting dependency shows in the dependant's `show`."""
    first = cli(database, "submit", "--", "true").stdout.strip()
    second = cli(database, "submit", "--after", first, "--", "true").stdout.strip()
    cli(database, "cancel", first)
    shown = cli(database, "show", second).stdout
    assert "cancelled" in shown
    assert f"waiting -> cancelled: dependency {first} was cancelled" in shown
