"""Hypothesis strategies shared by the unit tests.

Alphabets are deliberately tiny (three projects, three templates, three locks) so
that generated tasks collide on them often and the blocking rules get exercised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from hypothesis import strategies as st

from taskpool._rules import Slot

PROJECTS = ("alpha", "beta", "gamma")
TEMPLATES = ("build", "deploy", "lint")
LOCKS = ("db", "gpu", "net")

projects: st.SearchStrategy[str] = st.sampled_from(PROJECTS)
templates: st.SearchStrategy[str | None] = st.none() | st.sampled_from(TEMPLATES)
lock_sets: st.SearchStrategy[frozenset[str]] = st.frozensets(st.sampled_from(LOCKS), max_size=2)
max_parallels: st.SearchStrategy[int] = st.integers(min_value=1, max_value=6)
project_limit_maps: st.SearchStrategy[dict[str, int]] = st.dictionaries(
    projects, st.integers(min_value=0, max_value=3)
)


@st.composite
def routes(draw: st.DrawFn) -> Slot:
    """One slot with a placeholder id (0); lists renumber them."""
    template = draw(templates)
    return Slot(
        task_id=0,
        project=draw(projects),
        template=template,
        template_parallel=template is not None and draw(st.booleans()),
        locks=draw(lock_sets),
    )


@st.composite
def slot_lists(
    draw: st.DrawFn, *, first_id: int = 1, min_size: int = 0, max_size: int = 10
) -> list[Slot]:
    """Slots with distinct, increasing task ids starting at `first_id`."""
    drawn = draw(st.lists(routes(), min_size=min_size, max_size=max_size))
    return [replace(slot, task_id=first_id + i) for i, slot in enumerate(drawn)]


def coexist(slot: Slot, others: Iterable[Slot]) -> bool:
    """True if `slot` may run alongside all of `others` by the template and lock rules.

    Written from the rules' description, independently of `taskpool._rules`.
    """
    for other in others:
        if slot.locks & other.locks:
            return False
        same_template = slot.template is not None and slot.template == other.template
        if same_template and not (slot.template_parallel and other.template_parallel):
            return False
    return True


@st.composite
def running_sets(draw: st.DrawFn, *, first_id: int = 1000, max_size: int = 6) -> list[Slot]:
    """Attempts holding a live lease: never two exclusive runs of a template, never a lock twice.

    Project limits are not respected on purpose: a limit may have been lowered
    while tasks were running, and the rules must then start nothing more there.
    """
    drawn = draw(slot_lists(first_id=first_id, max_size=max_size))
    kept: list[Slot] = []
    for slot in drawn:
        if coexist(slot, kept):
            kept.append(slot)
    return kept


@dataclass(frozen=True)
class ClaimScenario:
    """Everything `plan_claims` takes."""

    candidates: Sequence[Slot]
    running: Sequence[Slot]
    node_running: int
    max_parallel: int
    project_limits: Mapping[str, int]


@st.composite
def claim_scenarios(draw: st.DrawFn) -> ClaimScenario:
    """A consistent claim: waiting candidates in queue order, what runs, and the limits."""
    running = draw(running_sets())
    return ClaimScenario(
        candidates=draw(slot_lists(first_id=1, max_size=12)),
        running=running,
        # The claiming node's attempts are among `running`.
        node_running=draw(st.integers(min_value=0, max_value=len(running))),
        max_parallel=draw(max_parallels),
        project_limits=draw(project_limit_maps),
    )


byte_chunks: st.SearchStrategy[list[bytes]] = st.lists(
    st.one_of(
        st.binary(max_size=16),
        # Valid UTF-8 with multi-byte characters, so splits land inside them.
        st.text(max_size=6).map(lambda s: s.encode("utf-8")),
        st.sampled_from(
            [b"\x00", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80"]
        ),
    ),
    max_size=10,
)


@dataclass(frozen=True)
class RunningAttempt:
    """An attempt some node holds: `live` if its lease has not run out."""

    slot: Slot
    owner: str
    live: bool


@dataclass(frozen=True)
class WaitingTask:
    """A waiting task with its priority; `ready` unless its not-before is still ahead."""

    slot: Slot
    priority: int
    ready: bool


@dataclass(frozen=True)
class ClaimWorld:
    """A store's whole state before one claim by `CLAIMING_NODE`, in submission order."""

    running: Sequence[RunningAttempt]
    waiting: Sequence[WaitingTask]
    max_parallel: int
    project_limits: Mapping[str, int]
    fair_share: Mapping[str, float] | None = None


CLAIMING_NODE = "node-0"
NODES = (CLAIMING_NODE, "node-1", "node-2")


@st.composite
def claim_worlds(draw: st.DrawFn) -> ClaimWorld:
    """Attempts held by three nodes (some leases run out), waiting tasks with priorities
    (some not ready yet) and the claiming node's limits."""
    running = [
        RunningAttempt(slot, draw(st.sampled_from(NODES)), draw(st.booleans()))
        for slot in draw(running_sets(first_id=1))
    ]
    waiting = [
        WaitingTask(slot, draw(st.integers(0, 2)), draw(st.booleans() | st.just(True)))
        for slot in draw(slot_lists(first_id=len(running) + 1, max_size=12))
    ]
    return ClaimWorld(running, waiting, draw(max_parallels), draw(project_limit_maps))


#: Weights that make ties (1 and 2, 0.5 and 1) and shares no decimal writes exactly.
weights: st.SearchStrategy[float] = st.sampled_from([0.5, 1.0, 2.0, 3.0, 1 / 3, 2.5])
#: `fair_share` as the rules take it: off, equal weights, or weights for some projects.
fair_shares: st.SearchStrategy[Mapping[str, float] | None] = st.one_of(
    st.none(), st.just({}), st.dictionaries(projects, weights, min_size=1)
)


@st.composite
def fair_claim_worlds(draw: st.DrawFn) -> ClaimWorld:
    """A claim world whose claiming node shares fairly (equal weights or drawn ones)."""
    world = draw(claim_worlds())
    share = draw(st.just({}) | st.dictionaries(projects, weights, min_size=1))
    return replace(world, fair_share=share)


@st.composite
def fair_claim_scenarios(draw: st.DrawFn) -> tuple[ClaimScenario, Mapping[str, float]]:
    """A claim scenario and the weights of a fair claim (possibly all equal)."""
    share = draw(st.just({}) | st.dictionaries(projects, weights, min_size=1))
    return draw(claim_scenarios()), share
