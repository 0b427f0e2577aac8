"""The runner's scheduling policy, in one place that both the real run and the schedule simulation drive.

``Scheduler`` decides, over a DAG of named nodes (each naming the nodes it reads), which nodes start now: it
sweeps the pending nodes in their planned order, skips every node an input of which failed, and starts every node
whose inputs are all done while fewer than ``capacity`` run and the CPUs its actors hold fit the budget beside
those of the nodes running. ``PipelineRunner.execute_all`` drives it with threads
and real stages; ``simulate`` drives it with a virtual clock and recorded durations, so a simulated schedule is the
schedule the runner would follow, not a copy of its rules. ``stage_capacity`` and ``cpu_budget`` are the runner's
limits for given cluster resources, so the simulation can ask them about a cluster that does not exist.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cache
from typing import Callable, Hashable, Iterable, Iterator, Literal, Mapping, Protocol

from stages.config import RayConfig

START: Literal["start"] = "start"
SKIP: Literal["skip"] = "skip"


class HasInputs(Protocol):
    inputs: Mapping[str, str]


Graph = Mapping[str, "Iterable[str] | HasInputs"]


def dependencies(nodes: Graph) -> dict[str, tuple[str, ...]]:
    """Each node's inputs (node names), in the nodes' order, from ``StageNode``s (their ``inputs`` values) or from
    plain iterables of names."""
    return {name: tuple(node.inputs.values()) if hasattr(node, "inputs") else tuple(node)
            for name, node in nodes.items()}


class Scheduler:
    """Which nodes start next. The driver calls ``sweep`` whenever a node may have become startable (at the start
    and after each batch of finishes), starts what it yields, and reports each started node back with ``finish`` or
    ``fail``. A node counts as done once reported finished; a failed node makes every node that reads it, directly
    or not, ``skipped`` (it is in ``failed`` too, with the input that broke it), and no other node.

    ``keys`` gives nodes that write one artifact the same key (the ensemble's member equal to the teacher is the
    teacher's artifact): such a node waits while another of its key runs, then starts and finds it in the cache,
    rather than computing the same artifact beside it.

    ``cpus`` gives the CPUs each node's Ray actors hold while it runs (``StageConfig.cpus_held``: training workers,
    Ray Data actor pools; nodes not named hold none). A node that holds some starts only while those of the running
    nodes and its own fit the sweep's ``cpu_budget``, or when no running node holds any (so a node larger than the
    budget still runs, alone)."""

    def __init__(self, nodes: Graph, done: Iterable[str] = (), keys: Mapping[str, Hashable] | None = None,
                 cpus: Mapping[str, float] | None = None):
        self.inputs = dependencies(nodes)
        self.keys = dict(keys or {})
        self.cpus = {name: float(held) for name, held in (cpus or {}).items() if held}
        self.done: set[str] = set(done)
        self.pending: list[str] = [name for name in self.inputs if name not in self.done]  # the planned order
        self.running: set[str] = set()
        self.failed: dict[str, str] = {}
        self.skipped: set[str] = set()

    def sweep(self, capacity: int | float | Callable[[], int | float],
              cpu_budget: float | Callable[[], float | None] | None = None) -> Iterator[tuple[str, str]]:
        """``(START, name)`` for each node to start now and ``(SKIP, name)`` for each node not to run because an
        input failed, in planned order. ``capacity`` (stages at once) and ``cpu_budget`` (CPUs the running nodes'
        actors may hold; None: no budget) may be callables (the runner's limits grow once Ray is up): each is asked
        at most once a sweep, and only when a node is ready to start, since asking the cluster is a call to Ray.
        Both are checked against the nodes running, those started by this sweep included, so the driver must start
        each node as it is yielded."""
        capacity, cpu_budget = asked_once(capacity), asked_once(cpu_budget)
        for name in list(self.pending):
            inputs = self.inputs[name]
            broken = [ref for ref in inputs if ref in self.failed]
            if broken:
                self.pending.remove(name)
                self.failed[name] = f"not run: its input {broken[0]!r} failed"
                self.skipped.add(name)
                yield SKIP, name
            elif (all(ref in self.done for ref in inputs) and not self._key_running(name)
                  and len(self.running) < capacity() and self._fits(name, cpu_budget)):
                self.pending.remove(name)
                self.running.add(name)
                yield START, name

    def _fits(self, name: str, budget: Callable[[], float | None]) -> bool:
        held = sum(self.cpus.get(other, 0.0) for other in self.running)
        if name not in self.cpus or held == 0:
            return True
        limit = budget()
        return limit is None or held + self.cpus[name] <= limit

    def _key_running(self, name: str) -> bool:
        key = self.keys.get(name)
        return key is not None and any(self.keys.get(other) == key for other in self.running)

    def finish(self, name: str) -> None:
        self.running.remove(name)
        self.done.add(name)

    def fail(self, name: str, reason: str) -> None:
        self.running.remove(name)
        self.failed[name] = reason


def asked_once(limit):
    """A limit as a function that asks ``limit`` (a value, or a callable) at most once."""
    return cache(limit) if callable(limit) else lambda: limit


def stage_capacity(settings: RayConfig,
                   resources: Mapping[str, float] | Callable[[], Mapping[str, float] | None] | None) -> int:
    """How many stages may run at once: ``ray.max_concurrent_stages``, else as many training stages as the cluster's
    ``resources`` (``ray.cluster_resources()``: CPUs, GPUs) hold, one CPU left for the Ray Data reads that feed
    them; 1 where there are no resources yet (Ray not up). ``resources`` may be a callable, asked only when the
    setting leaves the cap to the cluster."""
    if settings.max_concurrent_stages is not None:
        return settings.max_concurrent_stages
    if callable(resources):
        resources = resources()
    if resources is None:
        return 1
    limit = int((resources.get("CPU", 1) - 1) // (settings.num_workers * settings.cpus_per_worker))
    if settings.use_gpu:
        limit = min(limit, int(resources.get("GPU", 0) // settings.num_workers))
    return max(1, limit)



def cpu_budget(resources: Mapping[str, float] | None) -> float | None:
    """The CPUs that running stages' actors may hold at once on a cluster of ``resources``: all but one. Ray Data's
    read tasks (soft labels, augmentation, masked-LM top-k, a streamed corpus) each need a free CPU beside the
    actors they feed; with every CPU held by actors waiting for reads, no read can start (seen: an ensemble's soft
    labels beside the augmented corpus on 2 CPUs, both waiting forever). None where there are no resources yet."""
    return None if resources is None else resources.get("CPU", 1) - 1


# --- simulation ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """One node in a simulated schedule: when it started and finished (seconds from the start), and how it ended:
    ``done``, ``failed``, ``cached`` (its artifact existed when it started) or ``skipped`` (never ran; start and
    finish are when it was skipped)."""

    name: str
    start: float
    finish: float
    outcome: str


def simulate(nodes: Graph, durations: Mapping[str, float], capacity: int | float,
             failing: Iterable[str] = (), keys: Mapping[str, Hashable] | None = None,
             cpus: Mapping[str, float] | None = None, budget: float | None = None) -> tuple[float, list[Span]]:
    """The wall time of running ``nodes`` under the runner's policy (``Scheduler``) with each node taking its
    ``durations`` seconds, at most ``capacity`` at once (``math.inf``: no limit) and the CPUs ``cpus`` gives each
    within ``budget`` (None: no budget), and the timeline in start order. Time only passes while nodes run: the clock jumps to the earliest finish, and every node finishing then
    is reported before the next sweep, as ``wait(FIRST_COMPLETED)`` returns every future done by then.

    ``failing`` nodes fail when their time is up. ``keys`` gives nodes that write one artifact the same key, as two
    planned nodes with one content key do: the scheduler starts such a node only once the other has finished, and
    it is then taken from the cache in no time, as ``PipelineRunner.execute`` does."""
    missing = [name for name in nodes if name not in durations]
    if missing:
        raise ValueError(f"no duration for {len(missing)} node(s): {', '.join(map(repr, missing[:5]))}"
                         + (" …" if len(missing) > 5 else ""))
    if not capacity >= 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    failing = set(failing)
    scheduler = Scheduler(nodes, keys=keys, cpus=cpus)
    finished_keys: set[Hashable] = set()
    clock, order = 0.0, 0
    events: list[tuple[float, int, str, str]] = []  # (finish time, start order, name, outcome): a heap
    timeline: list[Span] = []
    while True:
        for action, name in scheduler.sweep(capacity, budget):
            if action == SKIP:
                timeline.append(Span(name, clock, clock, "skipped"))
                continue
            key = keys.get(name, name) if keys is not None else name
            cached = key in finished_keys and name not in failing
            outcome = "cached" if cached else "failed" if name in failing else "done"
            finish = clock + (0.0 if cached else float(durations[name]))
            heapq.heappush(events, (finish, order, name, outcome))
            order += 1
            timeline.append(Span(name, clock, finish, outcome))
        if not events:
            break
        clock = events[0][0]
        while events and events[0][0] == clock:
            _, _, name, outcome = heapq.heappop(events)
            if outcome == "failed":
                scheduler.fail(name, "failed (simulated)")
            else:
                scheduler.finish(name)
                finished_keys.add(keys.get(name, name) if keys is not None else name)
    return clock, timeline


def critical_path(nodes: Graph, durations: Mapping[str, float]) -> tuple[float, list[str]]:
    """The longest chain of nodes through the DAG by summed duration, and its nodes from first to last: the wall
    time no number of machines can beat. Among equal chains, the one ending earliest in the nodes' order, through
    each node's first longest input."""
    inputs = dependencies(nodes)
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}

    def longest(name: str, trail: tuple[str, ...] = ()) -> float:
        if name not in finish:
            if name in trail:
                raise ValueError(f"the graph has a cycle through {name!r}")
            best, best_input = 0.0, None
            for ref in inputs[name]:
                length = longest(ref, (*trail, name))
                if best_input is None or length > best:
                    best, best_input = length, ref
            finish[name], via[name] = best + float(durations[name]), best_input
        return finish[name]

    if not inputs:
        return 0.0, []
    end = max(inputs, key=lambda name: (longest(name), -list(inputs).index(name)))
    path, node = [], end
    while node is not None:
        path.append(node)
        node = via[node]
    return finish[end], path[::-1]


def capacities(settings: RayConfig, cpus_per_node: float, node_counts: Iterable[int],
               gpus_per_node: float = 0) -> dict[int, int]:
    """The runner's cap on stages at once (``stage_capacity``) on a cluster of ``n`` nodes of ``cpus_per_node``
    CPUs (and ``gpus_per_node`` GPUs) each, for each ``n``."""
    return {n: stage_capacity(settings, {"CPU": n * cpus_per_node, "GPU": n * gpus_per_node}) for n in node_counts}
