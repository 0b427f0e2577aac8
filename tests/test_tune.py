"""A 2-trial ASHA search on the smoke profile, to a registered model that loads through pyfunc; and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_experiment
from pipeline.search import run_tune

from conftest import SMOKE_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]
TWO_TRIALS = ["tune.samples=2", "tune.scheduler=asha", "students.kd_2L.train.epochs=2"]


@pytest.fixture(scope="module")
def search(smoke_pipeline):
    exp, _, _ = smoke_pipeline
    searched = load_experiment(SMOKE_CONFIG, TWO_TRIALS, workdir=exp.workdir)
    return searched, run_tune(searched, "kd", console=Console(width=160))


def test_search_runs_two_trials_and_writes_table_and_plot(search):
    exp, outcome = search
    assert len(outcome["records"]) == 2
    assert all(r["dev_accuracy"] is not None and r["latency_ms"] > 0 for r in outcome["records"])
    search_dir = Path(outcome["search_dir"])
    assert (search_dir / "pareto.png").stat().st_size > 1000 and "| trial |" in (search_dir / "trials.md").read_text()


def test_trial_runs_are_nested_and_ended(search):
    exp, _ = search
    mlflow.set_tracking_uri(exp.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[exp.experiment_name], output_format="list")
    parent = [r for r in runs if r.data.tags.get("kind") == "tune"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    trials = [r for r in runs if "trial_id" in r.data.tags]
    assert len(trials) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    assert {r.info.status for r in trials} <= {"FINISHED", "KILLED"}
    assert all("dev_accuracy" in r.data.metrics and "params.temperature" in r.data.params for r in trials)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent[0].info.run_id)}
    assert {"pareto.png", "trials.md", "trials.json"} <= artifacts


def test_registered_candidate_and_champion_predict_from_raw_text(search):
    exp, outcome = search
    name, version = outcome["registered"]["name"], outcome["registered"]["version"]
    mlflow.set_tracking_uri(exp.tracking_uri)
    tags = mlflow.MlflowClient().get_model_version(name, str(version)).tags
    assert tags["method"] == "kd" and float(tags["speedup"]) > 0 and "dev_accuracy" in tags
    result = CliRunner().invoke(app, ["promote", name, "--version", str(version), "--tracking-uri", exp.tracking_uri])
    assert result.exit_code == 0, result.output
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = model.predict(pd.DataFrame({"text": ["a wonderful, moving film", "dull and lifeless"]}))
    assert len(predictions) == 2 and set(predictions["label"]) <= {0, 1}


def test_promote_unknown_version_fails_clearly(search):
    exp, outcome = search
    result = CliRunner().invoke(app, ["promote", outcome["registered"]["name"], "--version", "99",
                                      "--tracking-uri", exp.tracking_uri])
    assert result.exit_code == 1 and "error" in result.output


def test_interrupted_search_resumes_without_duplicates(smoke_pipeline, ray_session):
    exp, _, _ = smoke_pipeline
    overrides = ["tune.samples=3", "tune.scheduler=fifo", f"ray.address={ray_session.get_runtime_context().gcs_address}"]
    command = [sys.executable, "-m", "pipeline", "tune", str(SMOKE_CONFIG), "--method", "kd", "--workdir", str(exp.workdir)]
    for assignment in overrides:
        command += ["--set", assignment]
    searched = load_experiment(SMOKE_CONFIG, overrides, workdir=exp.workdir)
    tune_root = exp.workdir / "tune"
    earlier_searches = set(tune_root.glob("kd-*"))
    log = exp.workdir / "interrupted-search.log"
    with log.open("w") as output:
        first = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        searches = set(tune_root.glob("kd-*")) - earlier_searches
        if any(path.read_text().strip() for search in searches for path in search.glob("*/result.json")):
            break  # this search has finished at least one epoch of one trial: interrupt it now, as Ctrl-C would
        time.sleep(1)
    assert first.poll() is None, "the search ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    try:
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    interrupted = log.read_text()
    assert first.returncode == 1 and "run the same command again to resume" in interrupted, interrupted[-2000:]
    assert "→ registered" not in interrupted

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resuming" in second.stdout
    mlflow.set_tracking_uri(searched.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[searched.experiment_name], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kind") == "tune" and r.data.params.get("samples") == "3"]
    assert len(parents) == 1
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id and "trial_id" in r.data.tags]
    assert len({r.data.tags["trial_id"] for r in trials}) == len(trials) == 3
    assert all(r.info.status == "FINISHED" for r in trials)
