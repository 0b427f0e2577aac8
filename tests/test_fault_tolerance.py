"""A training worker killed mid-run is restarted from its last checkpoint and finishes in the range of an
uninterrupted run; a stage killed half-way is never taken as complete."""

import pytest
from rich.console import Console

from pipeline.config import load_experiment
from pipeline.runner import PipelineRunner
from kd.worker import FAULT_ENV

from conftest import SMOKE_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]


def one_student(report_every: int) -> str:
    # report_every changes the cache key but not the training, so the two runs below are comparable.
    return ("students=[{name: kd_ft, method: kd, student: {layers: 2}, "
            f"train: {{epochs: 2, batch_size: 32, learning_rate: 1.0e-4, report_every: {report_every}}}}}]")


def test_killed_worker_resumes_from_checkpoint(smoke_pipeline, monkeypatch):
    exp, _, _ = smoke_pipeline
    faulty = load_experiment(SMOKE_CONFIG, [one_student(3), "ray.max_failures=1"], workdir=exp.workdir)
    monkeypatch.setenv(FAULT_ENV, "9")  # 7 steps an epoch: rank 0 dies in epoch 2, after epoch 1's checkpoint
    interrupted = PipelineRunner(faulty, Console(width=160)).run()["students"]["kd_ft"]
    monkeypatch.delenv(FAULT_ENV)
    steady = PipelineRunner(load_experiment(SMOKE_CONFIG, [one_student(4)], workdir=exp.workdir),
                            Console(width=160)).run()["students"]["kd_ft"]

    assert interrupted["epochs"] == 2
    results = [p.read_text() for p in exp.workdir.glob("artifacts/distill/*/result.json")]
    assert any('"event": "restored"' in text for text in results), "the faulted run must restore from a checkpoint"
    assert abs(interrupted["dev"]["accuracy"] - steady["dev"]["accuracy"]) <= 0.1


def test_failing_run_leaves_no_trusted_artifact(smoke_pipeline, monkeypatch):
    exp, _, _ = smoke_pipeline
    doomed = load_experiment(SMOKE_CONFIG, [one_student(5), "ray.max_failures=0"], workdir=exp.workdir)
    before = {p.parent for p in exp.workdir.glob("artifacts/distill/*/_COMPLETE")}
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(Exception):
        PipelineRunner(doomed, Console(width=160)).run()
    after = {p.parent for p in exp.workdir.glob("artifacts/distill/*/_COMPLETE")}
    assert after == before
    assert not list(exp.workdir.glob("artifacts/distill/.*.tmp-*"))


def test_a_failed_student_fails_alone_and_the_rerun_trains_only_it(smoke_pipeline, tmp_path):
    from kd.errors import StageError

    exp, _, _ = smoke_pipeline
    train = "train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-4, report_every: 7}"
    # The broken student comes first: its failure must not keep the one after it from training.
    broken = (f"{{name: broken, method: distilbert, student: {{layers: 2}}, params: {{mlm_head: {tmp_path / 'nothing'}}}, "
              f"{train}}}")
    sibling = f"{{name: sibling, method: kd, student: {{layers: 2}}, params: {{alpha: 0.6}}, {train}}}"
    first = PipelineRunner(load_experiment(SMOKE_CONFIG, [f"students=[{broken}, {sibling}]"], workdir=exp.workdir),
                           Console(width=160))
    with pytest.raises(StageError) as raised:
        first.run()
    assert set(raised.value.failures) == {"distill broken (distilbert)", "evaluate broken"}
    assert "distill sibling (kd)" in first.done and "evaluate sibling" in first.done

    repaired = broken.replace(f"mlm_head: {tmp_path / 'nothing'}", "alpha_mlm: 0")
    rerun = PipelineRunner(load_experiment(SMOKE_CONFIG, [f"students=[{repaired}, {sibling}]"], workdir=exp.workdir),
                           Console(width=160))
    rerun.run()
    ran = {name for name, state in rerun.board.states.items() if state == "done"}
    assert ran == {"distill broken (distilbert)", "evaluate broken"}
