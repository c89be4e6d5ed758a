"""What the pool reports as it works: structured log records, and metrics when a
metrics backend is attached. One place, so the pool's code says *what* happened
once and every sink hears it."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ._decisions import Settlement
from ._models import Outcome, OutcomeKind, TaskInfo

log = logging.getLogger("taskpool")


class Metrics(Protocol):
    """A metrics backend (see `taskpool.metrics.PrometheusMetrics`)."""

    def attempt_started(self, project: str) -> None: ...

    def attempt_ended(self, project: str, outcome: str, duration_s: float) -> None: ...

    def attempts_settled(self, status: str, count: int) -> None: ...

    def store_retried(self) -> None: ...

    def crashed(self) -> None: ...


def outcome_label(outcome: Outcome) -> str:
    """A small, fixed set of values for an attempt's end, fit for a metrics label."""
    if outcome.kind is OutcomeKind.EXITED:
        if outcome.exit_code == 0:
            return "exited_ok"
        return "killed" if (outcome.exit_code or 0) < 0 else "exited_error"
    return outcome.kind.value


class Telemetry:
    """Structured logs (record attribute `taskpool`: a dict of fields) plus metrics."""

    def __init__(self, node_id: str, metrics: Metrics | None) -> None:
        self.node_id = node_id
        self.metrics = metrics

    def _log(self, level: int, event: str, message: str, *args: Any, **fields: Any) -> None:
        fields = {"event": event, "node_id": self.node_id, **fields}
        log.log(level, message, *args, extra={"taskpool": fields})

    def node_started(self, containment: str, containment_mode: str) -> None:
        """The node runs; how it contains its attempts is said at once, never silently."""
        self._log(
            logging.INFO,
            "node_started",
            "taskpool node %s started; containment: %s",
            self.node_id,
            containment,
            containment=containment_mode,
        )

    def attempt_started(self, task: TaskInfo) -> None:
        self._log(
            logging.INFO,
            "attempt_started",
            "task %s attempt %s started",
            task.id,
            task.attempts_used,
            task_id=task.id,
            fence=task.fence,
            project=task.spec.project,
        )
        if self.metrics:
            self.metrics.attempt_started(task.spec.project)

    def attempt_ended(self, task: TaskInfo, outcome: Outcome, duration_s: float) -> None:
        label = outcome_label(outcome)
        level = logging.INFO if label == "exited_ok" else logging.WARNING
        self._log(
            level,
            "attempt_ended",
            "task %s attempt %s ended after %.3f s: %s",
            task.id,
            task.attempts_used,
            duration_s,
            outcome.reason,
            task_id=task.id,
            fence=task.fence,
            project=task.spec.project,
            outcome=label,
            exit_code=outcome.exit_code,
            reason=outcome.reason,
            duration_s=round(duration_s, 6),
        )
        if self.metrics:
            self.metrics.attempt_ended(task.spec.project, label, duration_s)

    def settled(self, task: TaskInfo, how: Settlement) -> None:
        """An attempt its runner never reported on was settled `how` (rescued after its
        lease expired, settled as a dead predecessor's orphan, handed back): the event is
        `attempt_<how>`, with the status the task went to."""
        self._log(
            logging.WARNING,
            f"attempt_{how.value}",
            "task %s %s -> %s: %s",
            task.id,
            how.value,
            task.status.value,
            task.reason,
            task_id=task.id,
            status=task.status.value,
            reason=task.reason,
        )
        if self.metrics:
            self.metrics.attempts_settled(task.status.value, 1)

    def store_retry(self, error: BaseException, *, first: bool) -> None:
        """A store call failed transiently and will be retried; logged once per outage."""
        if first:
            self._log(
                logging.WARNING,
                "store_unavailable",
                "store unavailable, retrying: %s",
                error,
                error=repr(error),
            )
        if self.metrics:
            self.metrics.store_retried()

    def crashed(self, error: BaseException) -> None:
        self._log(
            logging.ERROR,
            "node_crashed",
            "taskpool node %s crashed: %r",
            self.node_id,
            error,
            error=repr(error),
        )
        if self.metrics:
            self.metrics.crashed()

    def note(self, level: int, event: str, message: str, *args: Any, **fields: Any) -> None:
        """Anything else worth a record (no metric)."""
        self._log(level, event, message, *args, **fields)
