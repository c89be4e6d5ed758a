"""Prometheus metrics for a pool (the `metrics` extra: `pip install -e '.[metrics]'`).

    metrics = PrometheusMetrics()             # registers in prometheus_client's default registry
    async with TaskPool("tasks.db", metrics=metrics) as pool: ...

Serve them with `prometheus_client.start_http_server(port)`, or from the worker
with `taskpool worker --metrics-port 9100`.
"""

from __future__ import annotations

from typing import Any

#: Attempt durations span milliseconds (a `true`) to hours (a terraform apply).
DURATION_BUCKETS_S = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf"))


class PrometheusMetrics:
    """Counters, a gauge and a histogram of what a pool does, in one registry."""

    def __init__(self, registry: Any = None, namespace: str = "taskpool") -> None:
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.REGISTRY
        kw: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.started = prom.Counter(
            "attempts_started", "Attempts started (processes spawned or tried).", ["project"], **kw
        )
        self.ended = prom.Counter(
            "attempts_ended",
            "Attempts ended, by how: exited_ok, exited_error, killed, timed_out, stalled,"
            " cancelled, shutdown, lease_lost, spawn_failed.",
            ["project", "outcome"],
            **kw,
        )
        self.duration = prom.Histogram(
            "attempt_duration_seconds",
            "Wall time of an attempt, spawn to end.",
            ["project"],
            buckets=DURATION_BUCKETS_S,
            **kw,
        )
        self.running = prom.Gauge("running_attempts", "Attempts running on this node.", **kw)
        self.settled = prom.Counter(
            "orphans_settled",
            "Attempts of vanished owners re-queued or marked lost, by resulting status.",
            ["status"],
            **kw,
        )
        self.store_retries = prom.Counter(
            "store_retries", "Store calls retried because the store was unavailable.", **kw
        )
        self.crashes = prom.Counter("crashes", "Pool crashes (children killed).", **kw)

    def attempt_started(self, project: str) -> None:
        self.started.labels(project).inc()
        self.running.inc()

    def attempt_ended(self, project: str, outcome: str, duration_s: float) -> None:
        self.ended.labels(project, outcome).inc()
        self.duration.labels(project).observe(duration_s)
        self.running.dec()

    def attempts_settled(self, status: str, count: int) -> None:
        self.settled.labels(status).inc(count)

    def store_retried(self) -> None:
        self.store_retries.inc()

    def crashed(self) -> None:
        self.crashes.inc()
