"""Real infrastructure runs through a taskpool: terraform and ansible.

`terraform init` and `terraform apply` share a non-parallel template and the
`tfstate` lock (two applies on one state must never overlap), run in a copy of
`examples/infra/`; `apply` runs after `init` (`after=`): only once init has
succeeded, and is cancelled, naming it, if init fails. An ansible playbook runs
against localhost meanwhile. Each
runs with a timeout and a stall timeout, as a long apply or a hung SSH would.

    python examples/infra_runs.py [path/to/tasks.db]

Needs `terraform` on PATH and `ansible-playbook` (pip install ansible-core).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import anyio

from taskpool import Status, TaskPool

HERE = Path(__file__).resolve().parent / "infra"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"{name} not found on PATH")
    return found


async def main(db: Path, workdir: Path) -> int:
    shutil.copytree(HERE, workdir, dirs_exist_ok=True)
    terraform, ansible = _tool("terraform"), _tool("ansible-playbook")
    tf = {"cwd": str(workdir), "template": "terraform", "locks": ["tfstate"], "project": "infra"}
    # Added to the worker's environment; only these two are stored with the task.
    env = {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False"}
    async with TaskPool(db, max_parallel=3, kill_grace_s=10) as pool:
        init = await pool.submit(
            [terraform, "init", "-input=false", "-no-color"], timeout_s=300, **tf
        )
        runs = {
            "terraform init": init,
            "terraform apply": await pool.submit(
                [terraform, "apply", "-auto-approve", "-input=false", "-no-color"],
                after=[init],
                timeout_s=600,
                stall_timeout_s=300,
                **tf,
            ),
            "ansible playbook": await pool.submit(
                # This interpreter for the modules: no discovery through pyenv shims.
                [
                    ansible,
                    "-i",
                    "localhost,",
                    "-e",
                    f"ansible_python_interpreter={sys.executable}",
                    str(workdir / "playbook.yml"),
                ],
                cwd=str(workdir),
                env=env,
                project="config",
                timeout_s=600,
                stall_timeout_s=300,
            ),
        }
        failed = 0
        for label, task_id in runs.items():
            info = await pool.wait(task_id)
            after = f", after {', '.join(map(str, info.spec.after))}" if info.spec.after else ""
            print(f"== {label} (task {task_id}{after}): {info.status.value}, {info.reason}")
            print((await pool.output(task_id)).rstrip())
            failed += info.status is not Status.SUCCEEDED
    return 1 if failed else 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp) / "tasks.db"
        sys.exit(anyio.run(main, db, Path(tmp) / "infra"))
