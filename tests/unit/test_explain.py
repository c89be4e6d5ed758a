"""Why a waiting task waits (`taskpool._explain`): the texts, and properties that
tie every answer to the claim's own oracle, `plan_claims`: a task given no reason is
one the live nodes would claim now, and every reason given is a real block."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from taskpool import NodeInfo, Status, TaskInfo, TaskSpec, WaitKind, WaitReason
from taskpool._explain import (
    READY_TEXT,
    describe,
    explain_waiting,
    fair_share_text,
    fills_every_node,
    queue_order,
    slot,
)
from taskpool._rules import plan_claims
from tests.strategies import LOCKS, PROJECTS, TEMPLATES

NOW = 1_800_000_000.0
NODE_A = "node-a-0000"


def task(
    task_id: int,
    status: Status = Status.WAITING,
    *,
    node: str = NODE_A,
    lease_live: bool = True,
    attempts_used: int | None = None,
    reason: str = "submitted",
    **spec: object,
) -> TaskInfo:
    running = status is Status.RUNNING
    return TaskInfo(
        id=task_id,
        spec=TaskSpec.build(["true"], **spec),  # type: ignore[arg-type]
        status=status,
        submitted_at=NOW - 100 + task_id,
        attempts_used=(1 if running else 0) if attempts_used is None else attempts_used,
        fence=1 if running else 0,
        owner_node=node if running else None,
        lease_expires_at=(NOW + 30 if lease_live else NOW - 1) if running else None,
        pid=4000 + task_id if running else None,
        started_at=NOW - 192 if running else None,
        finished_at=None,
        exit_code=None,
        reason=reason,
        cancel_requested=None,
    )


def node(
    node_id: str = NODE_A,
    host: str = "web-1",
    max_parallel: int = 4,
    *,
    started_at: float = NOW - 1000,
    project_limits: dict[str, int] | None = None,
    fair_share: dict[str, float] | None = None,
) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        host=host,
        pid=10,
        pid_started_at=started_at,
        started_at=started_at,
        heartbeat_at=NOW - 1,
        stopped_at=None,
        max_parallel=max_parallel,
        project_limits=project_limits or {},
        fair_share=fair_share,
    )


def why(
    t: TaskInfo,
    running: Sequence[TaskInfo] = (),
    nodes: Sequence[NodeInfo] = (node(),),
    queue: Sequence[TaskInfo] = (),
) -> list[WaitReason]:
    return explain_waiting([t], queue=queue, running=running, nodes=nodes, now=NOW)[t.id]


def text(t: TaskInfo, *args: Sequence[object]) -> str:
    return describe(why(t, *args))  # type: ignore[arg-type]


def test_the_holder_of_a_template_or_a_lock_is_named_with_its_node_host_and_run_time() -> None:
    holder = task(41, Status.RUNNING, template="apply-prod", locks=["prod-state"])
    [by_template] = why(task(42, template="apply-prod"), [holder])
    assert by_template.kind is WaitKind.TEMPLATE
    assert by_template.subject == "apply-prod"
    assert by_template.holder_ids == (41,)
    assert by_template.text == (
        "template 'apply-prod' is held by task 41 "
        "(running on node node-a-0 on host web-1 for 3 min 12 s)"
    )
    [by_lock] = why(task(43, locks=["prod-state"]), [holder])
    assert (by_lock.kind, by_lock.subject, by_lock.holder_ids) == (
        WaitKind.LOCK,
        "prod-state",
        (41,),
    )
    assert by_lock.text == (
        "lock 'prod-state' is held by task 41 "
        "(running on node node-a-0 on host web-1 for 3 min 12 s)"
    )
    both = why(task(44, template="apply-prod", locks=["prod-state"]), [holder])
    assert [r.kind for r in both] == [WaitKind.TEMPLATE, WaitKind.LOCK]


def test_parallel_runs_of_a_template_hold_nothing_but_a_non_parallel_one() -> None:
    other = task(45, Status.RUNNING, template="x", template_parallel=True)
    assert why(task(44, template="x", template_parallel=True), [other]) == []
    [held] = why(task(46, template="x"), [other])  # a non-parallel one waits for every run
    assert held.holder_ids == (45,)
    exclusive = task(47, Status.RUNNING, template="x")
    [held] = why(task(44, template="x", template_parallel=True), [other, exclusive])
    assert held.holder_ids == (47,)  # the parallel run does not hold a parallel task


def test_an_expired_lease_holds_nothing_as_in_the_claim() -> None:
    gone = task(41, Status.RUNNING, template="t", lease_live=False)
    assert why(task(42, template="t"), [gone]) == []


def test_start_time_and_retry_backoff() -> None:
    later = task(1, not_before=NOW + 3600)
    [reason] = why(later)
    assert (reason.kind, reason.until) == (WaitKind.NOT_BEFORE, NOW + 3600)
    assert reason.text == "not before 2027-01-15 09:00:00Z (in 1 h 0 min)"
    backoff = replace(later, attempts_used=1, reason="exited with code 1; retrying in 3600 s")
    [reason] = why(backoff)
    assert reason.kind is WaitKind.RETRY_BACKOFF
    assert reason.text == (
        "retry backoff until 2027-01-15 09:00:00Z (in 1 h 0 min);"
        " last attempt: exited with code 1; retrying in 3600 s"
    )


def test_no_live_node() -> None:
    [reason] = why(task(2), [], [])
    assert reason.kind is WaitKind.NO_LIVE_NODE
    assert reason.text == "no live node: no worker is running on this store"
    stopped = replace(node(), stopped_at=NOW - 5)
    assert why(task(2), [], [stopped])[0].kind is WaitKind.NO_LIVE_NODE


def test_every_node_full_and_room_on_one() -> None:
    busy = [task(n, Status.RUNNING) for n in range(10, 14)]
    [reason] = why(task(3), busy)
    assert reason.kind is WaitKind.NODES_FULL
    assert reason.text == "every node is full (4/4 on web-1)"
    assert [(n.running, n.max_parallel) for n in reason.nodes] == [(4, 4)]
    assert why(task(3), busy[:3]) == []
    assert text(task(3), busy[:3]) == READY_TEXT
    two = [node(), node("node-b-0000", "web-1", 1, started_at=NOW - 10)]
    other = task(20, Status.RUNNING, node="node-b-0000")
    assert text(task(3), [*busy, other], two) == (
        "every node is full (4/4 on web-1 (node node-a-0), 1/1 on web-1 (node node-b-0))"
    )
    assert why(task(3), busy, two) == []  # the second node has room


def test_a_project_at_its_limit_names_its_running_tasks_and_disagreeing_nodes() -> None:
    running = [task(40, Status.RUNNING, project="infra")]
    one = [node(project_limits={"infra": 1})]
    [reason] = why(task(50, project="infra"), running, one)
    assert (reason.kind, reason.subject, reason.limit) == (WaitKind.PROJECT_LIMIT, "infra", 1)
    assert reason.holder_ids == (40,)
    assert reason.text == "project 'infra' is at its limit 1: task 40"
    assert why(task(51, project="other"), running, one) == []

    running.append(task(41, Status.RUNNING, project="infra", node="node-b-0000"))
    two = [
        node(project_limits={"infra": 1}),
        node("node-b-0000", "web-2", started_at=NOW - 10, project_limits={"infra": 2}),
    ]
    [reason] = why(task(50, project="infra"), running, two)
    assert reason.limit == 2
    assert reason.text == (
        "project 'infra' is at its limit 2: tasks 40, 41 (live nodes disagree on its limit:"
        " 1 on web-1 (node node-a-0), 2 on web-2 (node node-b-0); the highest counts)"
    )
    # A node without a limit for the project could take it: nothing holds it.
    unlimited = [*two, node("node-c-0000", "web-3", started_at=NOW - 5)]
    assert why(task(50, project="infra"), running, unlimited) == []


def test_a_project_limit_with_the_other_nodes_full() -> None:
    running = [task(40, Status.RUNNING, project="infra")]
    running += [task(n, Status.RUNNING, node="node-b-0000") for n in (60, 61)]
    nodes = [
        node(project_limits={"infra": 1}),
        node("node-b-0000", "web-2", 2, started_at=NOW - 10),
    ]
    assert text(task(50, project="infra"), running, nodes) == (
        "project 'infra' is at its limit 1: task 40; the other nodes are full (2/2 on web-2)"
    )


def test_behind_earlier_tasks_that_take_the_free_slots() -> None:
    busy = [task(n, Status.RUNNING) for n in range(10, 13)]  # one slot free
    ahead = task(20)
    me = task(21)
    [reason] = why(me, busy, [node()], [ahead])
    assert (reason.kind, reason.ahead) == (WaitKind.BEHIND, 1)
    assert reason.text == "waiting behind 1 earlier task that a node will claim first"
    # A higher priority goes first whatever its id.
    urgent = task(22, priority=5)
    assert why(urgent, busy, [node()], [ahead]) == []
    assert why(me, busy, [node()], [ahead, urgent])[0].ahead == 1
    # An earlier task of the same template will take it first even with slots to spare.
    [reason] = why(task(31, template="t"), [], [node()], [task(30, template="t")])
    assert (reason.kind, reason.ahead) == (WaitKind.BEHIND, 1)
    # Blocked earlier tasks are skipped, as the claim skips them.
    holder = task(40, Status.RUNNING, locks=["l"])
    assert why(me, [*busy, holder][1:], [node()], [task(20, locks=["l"])]) == []


def test_many_holders_are_counted_not_all_named() -> None:
    running = [task(n, Status.RUNNING, project="p", node=f"n{n}") for n in range(100, 112)]
    nodes = [node(f"n{n}", f"h{n}", 1, project_limits={"p": 12}) for n in range(100, 112)]
    nodes.append(node(project_limits={"p": 12}))
    [reason] = why(task(5, project="p"), running, nodes)
    assert (
        "is at its limit 12: tasks 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 2 more;"
        in reason.text
    )
    assert len(reason.holders) == 12


# -- properties against the claim's oracle -------------------------------------------


def leased(t: TaskInfo) -> bool:
    return t.lease_expires_at is not None and t.lease_expires_at >= NOW


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[NodeInfo], list[TaskInfo], list[TaskInfo]]:
    """Live nodes, running tasks on them (some with an expired lease) and a queue."""
    n_nodes = draw(st.integers(0, 3))
    nodes = [
        node(
            f"node-{i}",
            f"host-{i % 2}",
            draw(st.integers(1, 4)),
            started_at=NOW - 100 + i,
            project_limits=draw(st.dictionaries(st.sampled_from(PROJECTS), st.integers(0, 3))),
        )
        for i in range(n_nodes)
    ]

    def spec() -> dict[str, Any]:
        template = draw(st.none() | st.sampled_from(TEMPLATES))
        return {
            "project": draw(st.sampled_from(PROJECTS)),
            "template": template,
            "template_parallel": template is not None and draw(st.booleans()),
            "locks": draw(st.frozensets(st.sampled_from(LOCKS), max_size=2)),
            "priority": draw(st.integers(0, 2)),
        }

    running: list[TaskInfo] = []
    for i in range(draw(st.integers(0, 6)) if nodes else 0):
        owner = draw(st.sampled_from(nodes))
        live = draw(st.booleans())
        busy = sum(1 for t in running if t.owner_node == owner.id and leased(t))
        if busy < owner.max_parallel or not live:  # a claim never overfills a node
            running.append(task(100 + i, Status.RUNNING, node=owner.id, lease_live=live, **spec()))
    waiting = []
    for i in range(draw(st.integers(1, 10))):
        later = draw(st.booleans()) and draw(st.booleans())
        retried = draw(st.booleans())
        waiting.append(
            task(
                1 + i,
                not_before=NOW + 60 if later else None,
                attempts_used=1 if retried else 0,
                **spec(),
            )
        )
    return nodes, running, waiting


def fleet_claims(
    nodes: Sequence[NodeInfo], running: Sequence[TaskInfo], waiting: Sequence[TaskInfo]
) -> list[int]:
    """The oracle, by `plan_claims` one task at a time: in queue order, each due task
    goes to the oldest node that would start it given what runs and what went before."""
    live = [slot(t) for t in running if leased(t)]
    busy = Counter(t.owner_node for t in running if leased(t))
    queue = sorted((t for t in waiting if (t.spec.not_before or 0) <= NOW), key=queue_order)
    chosen: list[int] = []
    for t in queue:
        for n in sorted(nodes, key=lambda n: n.started_at):
            if plan_claims(
                [slot(t)],
                [*live, *(slot(w) for w in queue if w.id in chosen)],
                node_running=busy[n.id],
                max_parallel=n.max_parallel,
                project_limits=n.project_limits,
            ):
                chosen.append(t.id)
                busy[n.id] += 1
                break
    if len(nodes) == 1:  # for one node, exactly what its claim chooses
        [n] = nodes
        assert chosen == [
            s.task_id
            for s in plan_claims(
                [slot(t) for t in queue],
                live,
                node_running=busy[n.id] - len(chosen),
                max_parallel=n.max_parallel,
                project_limits=n.project_limits,
            )
        ]
    return chosen


def runs_alone_on(n: NodeInfo, t: TaskInfo, running: Sequence[TaskInfo]) -> bool:
    """Whether `n` would start `t` were it first in the queue."""
    live = [r for r in running if leased(r)]
    return bool(
        plan_claims(
            [slot(t)],
            [slot(r) for r in live],
            node_running=sum(1 for r in live if r.owner_node == n.id),
            max_parallel=n.max_parallel,
            project_limits=n.project_limits,
        )
    )


@given(fleets())
def test_no_reason_means_claimable_and_every_reason_is_a_real_block(
    fleet: tuple[list[NodeInfo], list[TaskInfo], list[TaskInfo]],
) -> None:
    nodes, running, waiting = fleet
    reasons = explain_waiting(waiting, queue=waiting, running=running, nodes=nodes, now=NOW)
    claimed = fleet_claims(nodes, running, waiting)
    live = [r for r in running if leased(r)]
    busy = Counter(r.owner_node for r in live)
    for t in waiting:
        given_reasons = reasons[t.id]
        assert (given_reasons == []) == (t.id in claimed), (t, given_reasons)
        kinds = [r.kind for r in given_reasons]
        event(f"reasons: {sorted(k.value for k in kinds) or 'claimable'}")
        if t.spec.not_before is not None:
            assert kinds == [WaitKind.RETRY_BACKOFF if t.attempts_used else WaitKind.NOT_BEFORE]
            continue
        if not nodes:
            assert kinds == [WaitKind.NO_LIVE_NODE]
            continue
        if WaitKind.BEHIND in kinds:
            [behind] = given_reasons
            order = {w.id: queue_order(w) for w in waiting}
            assert behind.ahead == sum(1 for c in claimed if order[c] < order[t.id]) > 0
            assert any(runs_alone_on(n, t, running) for n in nodes)  # nothing that runs holds it
            continue
        if given_reasons:  # held by what runs: no node would start it even first in line
            assert not any(runs_alone_on(n, t, running) for n in nodes)
        for r in given_reasons:
            if r.kind is WaitKind.NODES_FULL:
                assert all(busy[n.id] >= n.max_parallel for n in nodes)
            elif r.kind is WaitKind.PROJECT_LIMIT:
                room = [n for n in nodes if busy[n.id] < n.max_parallel]
                in_project = sorted(x.id for x in live if x.spec.project == t.spec.project)
                assert r.limit == max(n.project_limits[t.spec.project] for n in room)
                assert list(r.holder_ids) == in_project
                assert len(in_project) >= r.limit
            elif r.kind is WaitKind.TEMPLATE:
                assert r.holders
                assert r.subject == t.spec.template
                for h in r.holders:
                    other = next(x for x in live if x.id == h.task_id)
                    assert other.spec.template == t.spec.template
                    assert not (t.spec.template_parallel and other.spec.template_parallel)
            elif r.kind is WaitKind.LOCK:
                assert r.holders
                assert r.subject in t.spec.locks
                assert all(
                    r.subject in next(x for x in live if x.id == h.task_id).spec.locks
                    for h in r.holders
                )
            else:
                raise AssertionError(f"unexpected reason {r}")


@given(fleets(), st.data())
def test_a_first_part_of_the_queue_that_fills_every_node_tells_the_same(
    fleet: tuple[list[NodeInfo], list[TaskInfo], list[TaskInfo]], data: st.DataObject
) -> None:
    """What `Client.why` relies on to stop reading the queue early."""
    nodes, running, waiting = fleet
    me = data.draw(st.sampled_from(waiting))
    ahead = sorted(
        (
            t
            for t in waiting
            if (t.spec.not_before or 0) <= NOW and queue_order(t) < queue_order(me)
        ),
        key=queue_order,
    )
    whole = explain_waiting([me], queue=ahead, running=running, nodes=nodes, now=NOW)
    for k in range(len(ahead)):
        if fills_every_node(ahead[:k], running, nodes, now=NOW):
            part = explain_waiting([me], queue=ahead[:k], running=running, nodes=nodes, now=NOW)
            assert part == whole


def test_fair_share_in_words() -> None:
    assert fair_share_text(None) == "off"
    assert fair_share_text({}) == "on (every project 1)"
    assert fair_share_text({"b": 1.0, "a": 3.0, "c": 0.25}) == "on (a=3, b=1, c=0.25, others 1)"


def test_a_full_fair_node_names_the_weight_of_the_tasks_project() -> None:
    """Fair sharing changes no reason, only adds what the project weighs there."""
    busy = [task(n, Status.RUNNING, project="a") for n in range(10, 14)]
    fair = node(fair_share={"a": 3.0, "b": 1.0})
    [reason] = why(task(20, project="b"), busy, [fair])
    assert reason.kind is WaitKind.NODES_FULL
    assert reason.text == (
        "every node is full (4/4 on web-1); web-1 shares slots fairly across projects"
        " (a=3, b=1, others 1): project 'b' weighs 1, so another project's task may start first"
    )
    assert why(task(20, project="b"), busy, [node()])[0].text == "every node is full (4/4 on web-1)"
    # Unlisted: 1, as the claim takes it; True was recorded as {}.
    [reason] = why(task(20, project="c"), busy, [node(fair_share={})])
    assert reason.text.endswith(
        "web-1 shares slots fairly across projects (every project 1): project 'c' weighs 1,"
        " so another project's task may start first"
    )


def test_behind_earlier_tasks_names_only_the_fair_nodes_that_could_claim_it() -> None:
    """Of the nodes where nothing that runs holds the task, the fair ones, each with the
    project's weight where they disagree; a fair node at the project's limit is left out."""
    running = [task(9, Status.RUNNING, project="a")]  # on web-1; 'a' at web-4's limit
    web_4 = node(
        "node-d-0000", "web-4", 1, started_at=NOW - 1, project_limits={"a": 1}, fair_share={}
    )
    nodes = [
        node(max_parallel=5, fair_share={"a": 2.0}),
        node("node-b-0000", "web-2", 1, started_at=NOW - 10, fair_share={}),
        node("node-c-0000", "web-3", 1, started_at=NOW - 5),
        web_4,
    ]
    queue = [task(n) for n in range(10, 16)]  # 4 on web-1, 1 on web-2, 1 on web-3
    [reason] = why(task(20, project="a"), running, nodes, queue)
    assert (reason.kind, reason.ahead) == (WaitKind.BEHIND, 6)
    assert reason.text == (
        "waiting behind 6 earlier tasks that a node will claim first; web-1, web-2 share"
        " slots fairly across projects: project 'a' weighs 2 on web-1, 1 on web-2, so"
        " another project's task may start first"
    )
    # The only fair node is one the project's limit holds it from: nothing added.
    [reason] = why(task(20, project="a"), running, [node(max_parallel=5), web_4], queue[:4])
    assert reason.text == "waiting behind 4 earlier tasks that a node will claim first"
