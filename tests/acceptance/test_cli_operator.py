"""The command line behaves like the tools operators know: options before or after the
command, each also a `TASKPOOL_*` variable shown with its default in `--help`,
`--version`, shell completion, a quiet end when its reader goes (`| head -1`), a
missing extra named, and worker settings that cannot work refused in the flags' own
terms. Every command runs as a real process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from taskpool import Limits, NodeInfo, TaskSpec
from taskpool._models import Outcome, OutcomeKind
from taskpool.cli import build_parser
from tests.helpers import eventually, open_store

ROOT = Path(__file__).resolve().parents[2]
TASKPOOL = [sys.executable, "-m", "taskpool"]


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKPOOL, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _commands() -> dict[str, list[object]]:
    """Each command and its options (from the parser itself: new commands included)."""
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.choices and a.dest == "command"]
    assert isinstance(commands.choices, dict)
    return {
        name: [a for a in sub._actions if a.option_strings and a.dest != "help"]
        for name, sub in commands.choices.items()
    }


def test_global_options_go_before_or_after_the_command(tmp_path: Path) -> None:
    """`taskpool ls --json` and `taskpool --json ls` are the same; so is `--db`."""
    db = str(tmp_path / "t.db")
    task = json.loads(ok(run("submit", "--db", db, "--json", "--", "true")))["id"]
    after = json.loads(ok(run("ls", "--json", "--db", db)))
    before = json.loads(ok(run("--json", "--db", db, "ls")))
    assert [t["id"] for t in after] == [t["id"] for t in before] == [task]
    # Given after the command, a global option wins over the same given before it.
    assert (
        json.loads(
            ok(run("--db", str(tmp_path / "none.db"), "show", str(task), "--db", db, "--json"))
        )["task"]["id"]
        == task
    )
    assert ok(run("--version")).strip() == f"taskpool {_installed_version()}"


def _installed_version() -> str:
    from importlib import metadata

    return metadata.version("taskpool-anyio")


def test_every_option_has_a_variable_shown_with_its_default_in_help() -> None:
    """Each option of each command names its TASKPOOL_* variable and its default on
    its `--help` line (the global ones on every command too)."""
    for command, actions in _commands().items():
        text = " ".join(ok(run(command, "--help")).split())  # unwrapped
        for action in actions:
            variable = getattr(action, "env_variable", None)
            assert variable is not None, (command, action)
            assert variable.startswith("TASKPOOL_"), (command, variable)
            assert f"; env {variable}]" in text, (command, variable)
        for flag in ("--db", "--json", "--show-env"):
            assert flag in text, (command, flag)
    assert "[default: 4; env TASKPOOL_MAX_PARALLEL]" in " ".join(
        ok(run("worker", "--help")).split()
    )


def test_variables_set_every_kind_of_option_and_the_command_line_wins(tmp_path: Path) -> None:
    """Values, flags and repeatable options from variables; the flag beats its
    variable (a repeatable one replaces the variable's list); a bad value is a usage
    error naming the variable; a secret in a variable's value never shows in --help."""
    env = {
        "TASKPOOL_DB": str(tmp_path / "t.db"),
        "TASKPOOL_JSON": "1",
        "TASKPOOL_SUBMIT_PROJECT": "infra",
        "TASKPOOL_SUBMIT_LOCK": "state, dns",
        "TASKPOOL_SUBMIT_TIMEOUT_S": "60",
    }
    first = json.loads(ok(run("submit", "--", "true", env=env)))["id"]
    second = json.loads(
        ok(run("submit", "--project", "web", "--lock", "cdn", "--", "true", env=env))
    )["id"]
    shown = {t["id"]: t["spec"] for t in json.loads(ok(run("ls", env=env)))}
    assert (shown[first]["project"], shown[first]["locks"]) == ("infra", ["dns", "state"])
    assert shown[first]["timeout_s"] == 60
    assert (shown[second]["project"], shown[second]["locks"]) == ("web", ["cdn"])
    only_infra = run(
        "ls", env={**env, "TASKPOOL_LS_PROJECT": "infra", "TASKPOOL_LS_STATUS": "waiting,running"}
    )
    assert [t["id"] for t in json.loads(ok(only_infra))] == [first]
    text = ok(run("ls", "--no-json", env=env))  # a flag turned on by a variable, turned off
    assert text.split()[0] == str(second)
    bad = run("ls", env={**env, "TASKPOOL_LS_LIMIT": "many"})
    assert bad.returncode == 2
    assert "argument --limit: from TASKPOOL_LS_LIMIT='many': not an integer" in bad.stderr
    bad_choice = run("ls", env={**env, "TASKPOOL_LS_STATUS": "waiting,done"})
    assert bad_choice.returncode == 2
    assert "invalid choice: 'done'" in bad_choice.stderr
    secret = run("ls", "--help", env={"TASKPOOL_DB": "postgresql://me:hunter2@db/tasks"})
    assert "hunter2" not in ok(secret)
    assert "from TASKPOOL_DB" in " ".join(secret.stdout.split())


def _complete(script: str, *words: str) -> list[str]:
    """What bash offers for the last of `words` (an empty one: a new word)."""
    line = " ".join(f"'{w}'" for w in words)
    program = (
        f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _taskpool; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return sorted(filter(None, result.stdout.splitlines()))


def test_bash_completion_completes_commands_options_and_choices() -> None:
    """The script `completion bash` prints, run by bash as it completes a line."""
    script = ok(run("completion", "bash"))
    commands = sorted(_commands())
    assert _complete(script, "taskpool", "") == commands
    assert _complete(script, "taskpool", "l") == ["logs", "ls"]
    assert _complete(script, "taskpool", "--db", "x.db", "s") == [
        "schedule",
        "show",
        "stale",
        "submit",
    ]
    assert _complete(script, "taskpool", "ls", "--st") == ["--status"]
    assert _complete(script, "taskpool", "ls", "--status", "") == sorted(
        ["waiting", "running", "succeeded", "failed", "timed_out", "stalled", "cancelled", "lost"]
    )
    assert _complete(script, "taskpool", "worker", "--log-format", "j") == ["json"]
    assert "--heartbeat-interval" in _complete(script, "taskpool", "worker", "--")
    assert _complete(script, "taskpool", "logs", "--j") == ["--json"]  # global, after
    assert _complete(script, "taskpool", "completion", "") == ["bash", "zsh"]
    assert _complete(script, "taskpool", "submit", "--", "ech") == []  # the shell's own


def test_zsh_completion_names_every_command_and_option() -> None:
    """No zsh on the test machines: its script is checked for what it offers."""
    script = ok(run("completion", "zsh"))
    assert script.startswith("#compdef taskpool\n")
    assert "compdef _taskpool taskpool" in script
    for command, actions in _commands().items():
        assert f"{command}) choices=" in script
        for action in actions:
            for flag in action.option_strings:  # type: ignore[attr-defined]
                if flag.startswith("--"):
                    assert flag in script, flag


async def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`taskpool ls | head -1` and `taskpool logs ID | head -1`, through real pipes,
    with more output than a pipe holds: exit 0, nothing on stderr."""
    db = str(tmp_path / "t.db")
    async with open_store(db) as store:
        await store.submit_many([TaskSpec.build(["echo", "x" * 60]) for _ in range(3000)])
        now = time.time()
        await store.register_node(NodeInfo("n", "h", 1, now, now, now, None, 1))
        [claim] = await store.claim("n", Limits(max_parallel=1), lease_ttl_s=60)
        await store.append_output(claim.task.id, claim.fence, ["line\n" * 100_000])
        await store.finish(claim.task.id, claim.fence, Outcome(OutcomeKind.EXITED, "ok", 0))
    for command in (["ls", "--limit", "3000"], ["logs", str(claim.task.id)]):
        writer = subprocess.Popen(
            [*TASKPOOL, "--db", db, *command],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert writer.stdout is not None
        head = subprocess.run(["head", "-1"], stdin=writer.stdout, capture_output=True, timeout=60)
        writer.stdout.close()  # the reader's end is head's alone: it is gone now
        _, stderr = writer.communicate(timeout=60)
        assert head.stdout.count(b"\n") == 1
        assert (writer.returncode, stderr) == (0, b""), command


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("asyncpg", ["--db", "postgresql://me:hunter2@127.0.0.1:9/x", "ls"], "postgres"),
        ("prometheus_client", ["worker", "--metrics-port", "0"], "metrics"),
    ],
)
def test_a_missing_extra_is_named(tmp_path: Path, module: str, args: list[str], extra: str) -> None:
    """With the module hidden from the CLI's process (never uninstalled): the extra
    to install, exit 1, no traceback, no password."""
    hide = (
        f"import sys; sys.modules[{module!r}] = None; from taskpool.cli import main;"
        " sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide, "--db", str(tmp_path / "t.db"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert f"install taskpool-anyio[{extra}]" in result.stderr
    assert f"no module {module!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["--lease-ttl", "0"], {}, "argument --lease-ttl: must be > 0"),
        ([], {"TASKPOOL_LEASE_TTL_S": "0"}, "from TASKPOOL_LEASE_TTL_S='0': must be > 0"),
        (["--lease-ttl", "nan"], {}, "argument --lease-ttl: must be > 0"),
        (["--lease-ttl", "0.5"], {}, "--lease-ttl 0.5 s is too short"),
        (
            ["--lease-ttl", "10", "--heartbeat-interval", "9.5"],
            {},
            "--heartbeat-interval 9.5 s is too long for --lease-ttl 10 s",
        ),
        (["--reaper-interval", "0"], {}, "argument --reaper-interval: must be > 0"),
        (["--outage-tolerance", "-1"], {}, "argument --outage-tolerance: must be >= 0"),
        (["--kill-grace", "-1"], {}, "argument --kill-grace: must be >= 0"),
        (["--max-parallel", "0"], {}, "argument --max-parallel: must be > 0"),
        (["--metrics-port", "70000"], {}, "argument --metrics-port: not a port"),
        (["--project-limit", "infra"], {}, "argument --project-limit: wants PROJECT=N"),
    ],
)
def test_worker_settings_that_cannot_work_are_refused_in_the_flags_terms(
    tmp_path: Path, args: list[str], env: dict[str, str], said: str
) -> None:
    """Usage errors (exit 2) naming the flags, never the API's parameter names; the
    refused worker opens no database."""
    db = tmp_path / "t.db"
    result = run("--db", str(db), "worker", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr
    assert "_s " not in result.stderr
    assert "lease_ttl" not in result.stderr
    assert not db.exists()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_worker_metrics_host_and_intervals(tmp_path: Path) -> None:
    """`--metrics-host` binds metrics there (127.0.0.2, so not 127.0.0.1); the
    heartbeat and reaper intervals are accepted as the worker's own options."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            *TASKPOOL,
            "--db",
            str(tmp_path / "t.db"),
            "worker",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.2",
            "--heartbeat-interval",
            "0.2",
            "--reaper-interval",
            "0.5",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for _ in range(20):  # log records come first
            line = proc.stderr.readline()
            if "taskpool worker: node" in line or not line:
                break
        assert "taskpool worker: node" in line, line

        async def served() -> bytes | None:
            try:
                return await anyio.to_thread.run_sync(_fetch, f"http://127.0.0.2:{port}/metrics")
            except urllib.error.URLError:
                return None  # not listening yet

        assert b"taskpool" in await eventually(served)
        with pytest.raises(urllib.error.URLError):
            _fetch(f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0
