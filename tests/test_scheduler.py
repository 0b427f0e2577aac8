"""The runner runs its stage graph as a graph: every stage as soon as its inputs exist, up to the concurrency the
cluster allows; a failure fails its dependents and no sibling; concurrent writers of one key keep one artifact."""

import threading
import time
from unittest import mock

import pytest
from rich.console import Console

from pipeline.artifacts import COMPLETE_MARKER, ArtifactStore
from pipeline.config import validate
from pipeline.runner import PipelineRunner, StageFailures, StageNode
from stages.config import StageConfig

DOCUMENT = {"name": "graph", "task": {"source": "x.csv", "labels": [0, 1]},
            "students": [{"name": "s", "method": "finetune", "student": {"layers": 1}}]}


class Step(StageConfig):
    label: str
    seconds: float = 0.0
    fail: bool = False
    cpus: float = 0.0

    def cpus_held(self) -> float:
        return self.cpus


INTERVALS: dict[str, tuple[float, float]] = {}


def step(cfg: Step, inputs, ctx, out) -> dict:
    started = time.perf_counter()
    time.sleep(cfg.seconds)
    if cfg.fail:
        raise RuntimeError(f"{cfg.label} broke")
    INTERVALS[cfg.label] = (started, time.perf_counter())
    (out / "value").write_text(cfg.label)
    return {"label": cfg.label}


def runner_for(tmp_path, nodes: list[tuple[str, dict, dict]], concurrency: int) -> PipelineRunner:
    exp = validate({**DOCUMENT, "workdir": str(tmp_path), "ray": {"max_concurrent_stages": concurrency}})
    runner = PipelineRunner(exp, Console(width=120, quiet=True))
    runner.tracker = mock.Mock()
    runner.start_ray = lambda: None
    for name, config, inputs in nodes:
        runner.add(StageNode(name, "step", step, Step(label=name, **config), inputs))
    return runner


GRAPH = [("data", {}, {}), ("a", {"seconds": 0.5}, {"data": "data"}), ("b", {"seconds": 0.5}, {"data": "data"}),
         ("eval a", {}, {"model": "a"}), ("eval b", {}, {"model": "b"})]


def test_independent_stages_overlap_up_to_the_limit_and_wait_for_their_inputs(tmp_path):
    INTERVALS.clear()
    runner = runner_for(tmp_path, GRAPH, concurrency=2)
    runner.execute_all()
    a, b = INTERVALS["a"], INTERVALS["b"]
    assert a[0] < b[1] and b[0] < a[1]  # the two students ran at the same time
    assert INTERVALS["data"][1] <= min(a[0], b[0]) and INTERVALS["eval a"][0] >= a[1]
    assert runner.counts == {"ran": 5, "cached": 0}


def test_a_cap_that_grows_while_a_stage_runs_starts_the_waiting_stages_at_once(tmp_path, monkeypatch):
    # Ray starts inside the first stage that needs it, and only then does the cap leave 1.
    monkeypatch.setattr("pipeline.runner.RESWEEP_S", 0.05)
    INTERVALS.clear()
    graph = [("data", {}, {}), ("a", {"seconds": 1.5}, {"data": "data"}), ("b", {"seconds": 0.1}, {"data": "data"})]
    runner = runner_for(tmp_path, graph, concurrency=1)
    cap = {"stages": 1}
    runner.concurrency = lambda: cap["stages"]
    threading.Timer(0.3, cap.update, kwargs={"stages": 2}).start()
    runner.execute_all()
    a, b = INTERVALS["a"], INTERVALS["b"]
    assert b[0] < a[1], "b waited for a to finish although the cap had grown to 2"


def test_stages_whose_actors_would_hold_every_cpu_take_turns(tmp_path, monkeypatch):
    # On 2 CPUs two 1-CPU actor pools would leave Ray Data's reads none: with room for two stages they still take
    # turns, while two half-CPU students share the one CPU the budget allows.
    monkeypatch.setattr("pipeline.runner.ray.is_initialized", lambda: True)
    monkeypatch.setattr("pipeline.runner.ray.cluster_resources", lambda: {"CPU": 2})
    INTERVALS.clear()
    labels = {"a": "label a", "b": "label b"}
    graph = [("data", {}, {}), ("label a", {"seconds": 0.5, "cpus": 1}, {"data": "data"}),
             ("label b", {"seconds": 0.5, "cpus": 1}, {"data": "data"}),
             ("s1", {"seconds": 0.5, "cpus": 0.5}, labels), ("s2", {"seconds": 0.5, "cpus": 0.5}, labels)]
    runner_for(tmp_path, graph, concurrency=2).execute_all()
    a, b, s1, s2 = (INTERVALS[name] for name in ("label a", "label b", "s1", "s2"))
    assert a[1] <= b[0] or b[1] <= a[0]
    assert s1[0] < s2[1] and s2[0] < s1[1]


def test_one_at_a_time_when_the_limit_is_one(tmp_path):
    INTERVALS.clear()
    runner_for(tmp_path, GRAPH, concurrency=1).execute_all()
    a, b = INTERVALS["a"], INTERVALS["b"]
    assert a[1] <= b[0] or b[1] <= a[0]


def test_a_failure_fails_its_dependents_not_its_siblings_and_a_rerun_runs_only_what_did_not_finish(tmp_path):
    graph = [(name, {**config, "fail": name == "a"}, inputs) for name, config, inputs in GRAPH]
    runner = runner_for(tmp_path, graph, concurrency=2)
    with pytest.raises(StageFailures) as raised:
        runner.execute_all()
    assert set(raised.value.failures) == {"a", "eval a"}
    assert "a broke" in raised.value.failures["a"] and "'a' failed" in raised.value.failures["eval a"]
    assert str(raised.value) == "RuntimeError: a broke (stage 'a'; 1 stage(s) that read it did not run)"
    assert {"data", "b", "eval b"} <= set(runner.done)
    rerun = runner_for(tmp_path, GRAPH, concurrency=2)
    rerun.execute_all()
    assert rerun.counts == {"ran": 2, "cached": 3}


def test_concurrent_writers_of_one_key_both_finish_and_keep_one_complete_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    barrier = threading.Barrier(2)
    errors = []

    def write(text: str) -> None:
        try:
            with store.writing("s", "k") as scratch:
                (scratch / "value").write_text(text)
                barrier.wait(timeout=10)  # both hold a finished scratch folder before either publishes
        except Exception as error:  # noqa: BLE001 - the test reports any
            errors.append(error)

    threads = [threading.Thread(target=write, args=(text,)) for text in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors
    artifact = store.lookup("s", "k")
    assert artifact is not None and (artifact.path / COMPLETE_MARKER).exists()
    assert (artifact.path / "value").read_text() in ("one", "two")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["k"]  # no scratch folder left behind


def test_default_concurrency_leaves_a_cpu_for_ray_data(tmp_path, monkeypatch):
    exp = validate({**DOCUMENT, "workdir": str(tmp_path), "ray": {"num_workers": 2, "cpus_per_worker": 1}})
    runner = PipelineRunner(exp, Console(quiet=True))
    monkeypatch.setattr("pipeline.runner.ray.is_initialized", lambda: True)
    for cpus, expected in ((2, 1), (5, 2), (64, 31)):
        monkeypatch.setattr("pipeline.runner.ray.cluster_resources", lambda cpus=cpus: {"CPU": cpus})
        assert runner.concurrency() == expected
    monkeypatch.setattr("pipeline.runner.ray.is_initialized", lambda: False)
    assert runner.concurrency() == 1
