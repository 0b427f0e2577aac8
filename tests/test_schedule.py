"""The schedule simulation drives the runner's own policy: on a hand-made DAG (data → teacher → 3 students → 3
evaluations) its wall times and critical path are the hand-computed ones, and the real ``execute_all`` launches
the nodes in the order the simulation does, and skips the same dependents of a failure. No Ray."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.bench_schedule import recorded, recorded_wall, schedule
from pipeline.artifacts import write_result
from pipeline.runner import PipelineRunner, StageFailures
from pipeline.schedule import (SKIP, START, Scheduler, capacities, cpu_budget, critical_path, simulate,
                               stage_capacity)
from stages.config import RayConfig

from test_scheduler import runner_for as stub_runner

# Planned order as the runner plans it: each student's distill, then its evaluation.
DAG = {"data": [], "teacher": ["data"], "s1": ["teacher"], "e1": ["s1"], "s2": ["teacher"], "e2": ["s2"],
       "s3": ["teacher"], "e3": ["s3"]}
SECONDS = {"data": 1, "teacher": 4, "s1": 5, "e1": 2, "s2": 2, "e2": 1, "s3": 4, "e3": 1}
# By hand. One at a time: the sum, in planned order. Two at a time: s1 and s2 at 5; s2 ends at 7, e2 runs 7-8
# (e1 waits for s1), then s3 8-12; s1 ends at 10, e1 runs 10-12; e3 12-13. No limit: the critical path
# data → teacher → s1 → e1 = 12 (s3 → e3 ends at 10).
WALL = {1: 20, 2: 13, math.inf: 12}
ORDER = {1: ["data", "teacher", "s1", "e1", "s2", "e2", "s3", "e3"],
         2: ["data", "teacher", "s1", "s2", "e2", "s3", "e1", "e3"],
         math.inf: ["data", "teacher", "s1", "s2", "s3", "e2", "e3", "e1"]}
UNIT = 0.25  # real seconds per unit of SECONDS: the closest two finishes that decide an order are one unit apart


def started(timeline) -> list[str]:
    return [span.name for span in timeline if span.outcome != "skipped"]


@pytest.mark.parametrize("capacity", [1, 2, math.inf])
def test_simulated_wall_time_and_launch_order_are_the_hand_computed_ones(capacity):
    wall, timeline = simulate(DAG, SECONDS, capacity)
    assert wall == WALL[capacity]
    assert started(timeline) == ORDER[capacity]
    assert all(span.finish - span.start == SECONDS[span.name] and span.outcome == "done" for span in timeline)
    if capacity == 2:
        assert {span.name: span.start for span in timeline} == {
            "data": 0, "teacher": 1, "s1": 5, "s2": 5, "e2": 7, "s3": 8, "e1": 10, "e3": 12}


def test_the_critical_path_is_the_longest_chain():
    assert critical_path(DAG, SECONDS) == (12, ["data", "teacher", "s1", "e1"])
    assert critical_path(DAG, {**SECONDS, "s3": 9}) == (15, ["data", "teacher", "s3", "e3"])
    assert critical_path({}, {}) == (0.0, [])


def test_nodes_finishing_together_are_all_reported_before_the_next_sweep():
    # a and b end together at 1; swept after a alone, c (a's reader, planned first) would take the only free slot
    # of two with b still counted, then d: the same. With both reported, c and d start at 1 side by side.
    dag = {"a": [], "b": [], "c": ["a"], "d": ["b"]}
    wall, timeline = simulate(dag, {"a": 1, "b": 1, "c": 3, "d": 3}, 2)
    assert wall == 4 and {span.name: span.start for span in timeline} == {"a": 0, "b": 0, "c": 1, "d": 1}


def test_a_node_waits_for_its_twin_of_one_key_and_is_then_taken_from_the_cache():
    # An ensemble member equal to the teacher is a second node with the teacher's key, as in PipelineRunner.
    dag = {"data": [], "teacher": ["data"], "member": ["data"], "label": ["teacher", "member"]}
    seconds = {"data": 1, "teacher": 10, "member": 10, "label": 2}
    keys = {"teacher": "T", "member": "T"}
    wall, timeline = simulate(dag, seconds, 1, keys=keys)
    assert wall == 13 and [(s.name, s.outcome) for s in timeline][2] == ("member", "cached")
    # With room for both, the twin still waits: one artifact is computed once, not twice side by side.
    wall, timeline = simulate(dag, seconds, 2, keys=keys)
    spans = {span.name: span for span in timeline}
    assert wall == 13 and (spans["member"].start, spans["member"].outcome) == (11, "cached")


def test_simulate_rejects_a_node_without_a_duration_and_a_capacity_below_one():
    with pytest.raises(ValueError, match="no duration for 1 node"):
        simulate(DAG, {name: seconds for name, seconds in SECONDS.items() if name != "e3"}, 1)
    with pytest.raises(ValueError, match="capacity"):
        simulate(DAG, SECONDS, 0)


def test_the_scheduler_skips_every_reader_of_a_failure_and_nothing_else():
    scheduler = Scheduler(DAG)
    assert list(scheduler.sweep(8)) == [(START, "data")]
    scheduler.finish("data")
    assert list(scheduler.sweep(8)) == [(START, "teacher")]
    scheduler.finish("teacher")
    assert [name for _, name in scheduler.sweep(8)] == ["s1", "s2", "s3"]
    scheduler.fail("s2", "broke")
    assert list(scheduler.sweep(8)) == [(SKIP, "e2")]
    assert scheduler.failed == {"s2": "broke", "e2": "not run: its input 's2' failed"} and scheduler.skipped == {"e2"}
    assert scheduler.pending == ["e1", "e3"] and scheduler.running == {"s1", "s3"}


def test_capacity_for_n_nodes_is_the_runners_own_arithmetic(monkeypatch, tmp_path):
    settings = RayConfig(num_workers=1, cpus_per_worker=1)
    assert capacities(settings, 2, [1, 4, 16]) == {1: 1, 4: 7, 16: 31}
    assert capacities(RayConfig(num_workers=2, cpus_per_worker=2), 8, [1, 4]) == {1: 1, 4: 7}
    assert capacities(RayConfig(max_concurrent_stages=3), 2, [1, 16]) == {1: 3, 16: 3}
    assert capacities(RayConfig(use_gpu=True), 16, [1, 4], gpus_per_node=1) == {1: 1, 4: 4}
    assert stage_capacity(settings, None) == 1 and stage_capacity(settings, lambda: None) == 1
    runner = runner_for(tmp_path, {}, None)
    monkeypatch.setattr("pipeline.runner.ray.is_initialized", lambda: True)
    for cpus in (2, 5, 9, 64):
        monkeypatch.setattr("pipeline.runner.ray.cluster_resources", lambda cpus=cpus: {"CPU": cpus})
        assert runner.concurrency() == stage_capacity(runner.exp.ray, {"CPU": cpus})


# --- the real execute_all, with tests/test_scheduler.py's stub stages ---------------------------------------------


def runner_for(tmp_path, durations: dict[str, float], concurrency: int | None, failing=()) -> PipelineRunner:
    return stub_runner(tmp_path, [(name, {"seconds": seconds * UNIT, "fail": name in failing},
                                   {ref: ref for ref in DAG[name]}) for name, seconds in durations.items()],
                       concurrency)


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    """The nodes ``execute_all`` submits, in the order it submits them (the launch order, which the stage threads'
    own start order may not keep)."""
    names: list[str] = []

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            names.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr("pipeline.runner.ThreadPoolExecutor", RecordingPool)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [1, 2, 8])
def test_execute_all_launches_in_the_order_the_simulation_does(tmp_path, launched, capacity):
    runner = runner_for(tmp_path, SECONDS, capacity)
    runner.execute_all()
    _, timeline = simulate(runner.nodes, SECONDS, capacity)  # the runner's own StageNodes
    assert launched == started(timeline) == ORDER[capacity if capacity < 8 else math.inf]
    assert runner.counts == {"ran": 8, "cached": 0}


@pytest.mark.slow
def test_a_failure_skips_the_same_dependents_in_the_run_and_the_simulation(tmp_path, launched):
    runner = runner_for(tmp_path, SECONDS, 2, failing={"s2"})
    with pytest.raises(StageFailures) as raised:
        runner.execute_all()
    _, timeline = simulate(runner.nodes, SECONDS, 2, failing={"s2"})
    assert launched == started(timeline) == ["data", "teacher", "s1", "s2", "s3", "e1", "e3"]
    assert {span.name for span in timeline if span.outcome == "skipped"} == {"e2"}
    assert set(raised.value.failures) == {"s2", "e2"} and "s2 broke" in raised.value.failures["s2"]
    assert str(raised.value) == "RuntimeError: s2 broke (stage 's2'; 1 stage(s) that read it did not run)"
    assert set(runner.done) == {"data", "teacher", "s1", "e1", "s3", "e3"}


@pytest.mark.slow
def test_a_change_to_the_policy_changes_the_run_and_the_simulation_alike(tmp_path, launched, monkeypatch):
    # One policy, not two copies: start ready nodes newest-planned first, and both follow.
    plain = Scheduler.sweep

    def newest_first(self, capacity, cpu_budget=None):
        self.pending.reverse()
        try:
            yield from plain(self, capacity, cpu_budget)
        finally:
            self.pending.reverse()

    monkeypatch.setattr(Scheduler, "sweep", newest_first)
    runner = runner_for(tmp_path, SECONDS, 2)
    runner.execute_all()
    wall, timeline = simulate(runner.nodes, SECONDS, 2)
    assert launched == started(timeline) == ["data", "teacher", "s3", "s2", "e2", "s1", "e3", "e1"]
    assert wall == 15


# --- the benchmark's reading of a workdir ------------------------------------------------------------------------

def test_the_benchmark_reads_recorded_durations_under_the_planned_keys(tmp_path):
    runner = runner_for(tmp_path, SECONDS, None)
    for name, node in runner.nodes.items():
        if name == "e3":
            continue  # not finished
        with runner.store.writing(node.stage, runner.planned(name).key) as scratch:
            finished_at = 1017.0 if name == "e1" else 1001.0
            write_result(scratch, {"seconds": SECONDS[name], "started_at": 1000.0, "finished_at": finished_at})
    found, missing = recorded(runner)
    assert missing == ["e3"] and found["s1"]["seconds"] == 5 and recorded_wall(found) == 17
    with pytest.raises(SystemExit, match="'e3'"):
        schedule(runner, [1, 4], cpus_per_node=2)
    results = schedule(runner, [1, 4], cpus_per_node=2, allow_missing=True)
    assert [(row["nodes"], row["max_concurrent_stages"], row["wall_s"]) for row in results["simulated"]] == [
        (1, 1, 19), (4, 7, 12)]
    assert results["critical_path"] == ["data", "teacher", "s1", "e1"] and results["missing"] == ["e3"]
    assert results["simulated"][1]["speedup_over_1_node"] == round(19 / 12, 2)


def test_stages_holding_cpus_share_the_budget_and_never_take_ray_datas_last_cpu():
    # 2 CPUs, so a budget of 1 for actors. Two soft-label stages (a 1-CPU actor pool each) take turns, the two
    # half-CPU students run side by side, and a student never beside a label stage (1.5 > 1).
    dag = {"data": [], "label_a": ["data"], "label_b": ["data"], "s1": ["data"], "s2": ["data"]}
    seconds = {"data": 1, "label_a": 10, "label_b": 10, "s1": 10, "s2": 10}
    cpus = {"label_a": 1, "label_b": 1, "s1": 0.5, "s2": 0.5}
    budget = cpu_budget({"CPU": 2})
    wall, timeline = simulate(dag, seconds, 2, cpus=cpus, budget=budget)
    assert budget == 1 and wall == 31
    assert {span.name: span.start for span in timeline} == {"data": 0, "label_a": 1, "label_b": 11, "s1": 21, "s2": 21}
    # The cap alone would start both label stages at once, their actors holding both CPUs: no read could run.
    _, timeline = simulate(dag, seconds, 2)
    assert {span.name: span.start for span in timeline}["label_b"] == 1
    # A stage larger than the budget still runs, alone.
    wall, timeline = simulate({"big": [], "small": []}, {"big": 5, "small": 5}, 2, cpus={"big": 4, "small": 0.5},
                              budget=1)
    assert wall == 10 and [span.start for span in timeline] == [0, 5]
    assert cpu_budget(None) is None and cpu_budget({"CPU": 64}) == 63
