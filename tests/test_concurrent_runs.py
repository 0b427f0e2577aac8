"""Two runs of one experiment started at once on one workdir: both finish, and every artifact they share is whole.

The runs are two drivers in one process (two threads, each with its own PipelineRunner, MLflow parent run and
stage threads) on the session's local Ray, so they race for the same stage keys: each trains the new student, the
first to finish publishes it, and the other keeps the published artifact rather than replacing it under a reader.

Each driver caps its own stages (``ray.max_concurrent_stages``, or the cluster's CPUs less one kept for Ray Data's
reads), not the other's. On this test's 2-CPU Ray two 1-CPU trainers would hold both CPUs and leave none for the
reads that feed them, and both would wait forever; so each worker asks for half a CPU here, as two runs sharing a
small machine should.
"""

from __future__ import annotations

import shutil
import threading

import pytest
from rich.console import Console
from transformers import AutoConfig

from conftest import SMOKE_CONFIG
from kd.layout import STUDENT_DIR
from pipeline.config import load_experiment
from pipeline.runner import PipelineRunner


@pytest.mark.ray
@pytest.mark.e2e
def test_two_runs_at_once_on_one_workdir_both_finish_with_every_artifact_intact(smoke_pipeline, tmp_path):
    exp, _, _ = smoke_pipeline
    # A workdir of its own, with the smoke run's artifacts (data, teacher, soft labels come from the cache): the
    # smoke workdir's summary and MLflow runs stay the smoke run's, which later tests read.
    workdir = tmp_path / "work"
    shutil.copytree(exp.workdir / "artifacts", workdir / "artifacts")
    student = ("students=[{name: kd_twice, method: kd, student: {layers: 1}, "
               "train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-4, report_every: 7}}]")
    experiment = load_experiment(SMOKE_CONFIG, [student, "ray.cpus_per_worker=0.5", "ray.torch_threads=1"],
                                 workdir=workdir)
    summaries, errors = [], []

    def run() -> None:
        try:
            summaries.append(PipelineRunner(experiment, Console(width=160)).run())
        except Exception as error:  # noqa: BLE001  (reported by the assertion below, with its type)
            errors.append(error)

    drivers = [threading.Thread(target=run) for _ in range(2)]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join(timeout=900)
    assert not errors, [f"{type(error).__name__}: {error}" for error in errors]
    assert len(summaries) == 2
    # Both read the one published student: the same evaluation, to the last digit.
    first, second = (summary["students"]["kd_twice"] for summary in summaries)
    assert first["dev"] == second["dev"] and first["test"] == second["test"]
    artifacts = workdir / "artifacts"
    for complete in artifacts.glob("*/*/_COMPLETE"):
        folder = complete.parent
        assert (folder / "result.json").exists(), folder
        if (folder / STUDENT_DIR).exists():
            AutoConfig.from_pretrained(folder / STUDENT_DIR)  # whole enough to load
    assert not list(artifacts.glob("*/.*.tmp-*")), "a scratch folder was left behind"
