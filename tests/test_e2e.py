"""The smoke profile end to end through local Ray: summary.json, MLflow runs, and the stage cache."""

from pathlib import Path

import json

import mlflow
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_experiment
from pipeline.runner import PipelineRunner
from pipeline.tracking import RUN_FILE

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke_run(smoke_pipeline):
    return smoke_pipeline


def test_summary_reports_teacher_and_students(smoke_run):
    exp, _, summary = smoke_run
    on_disk = json.loads((exp.workdir / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary["students"]) == {"kd_2L", "finetune_2L"}
    teacher = summary["teacher"]
    assert teacher["fine_tuned"] and 0 <= teacher["dev"]["accuracy"] <= 1 and teacher["params"] > 20e6
    for name, student in summary["students"].items():
        assert {"accuracy", "f1", "mcc"} <= set(student["dev"]) and {"accuracy"} <= set(student["test"])
        assert student["params"] < teacher["params"] and student["compression"] > 1
        assert student["latency_ms"] > 0 and student["speedup"] > 0
    assert summary["students"]["kd_2L"]["method"] == "kd"


def test_report_is_written_and_logged(smoke_run):
    exp, _, summary = smoke_run
    report = (exp.workdir / "report.md").read_text()
    assert "| kd_2L | kd | teacher | 2 |" in report and "McNemar" in report
    assert (exp.workdir / "report_pareto.png").stat().st_size > 1000
    assert summary["students"]["kd_2L"]["epoch_seconds"] > 0
    assert summary["students"]["kd_2L"]["teacher_signals"] == "cached"
    mlflow.set_tracking_uri(exp.tracking_uri)
    parent = [r for r in mlflow.search_runs(experiment_names=[exp.experiment_name], output_format="list")
              if r.info.run_name == "smoke"][0]
    assert {"report/report.md", "report/report_pareto.png"} <= {
        a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}


def test_report_command_rewrites_the_report_and_logs_it_to_the_last_run(smoke_run):
    exp, _, _ = smoke_run
    run_id = json.loads((exp.workdir / RUN_FILE).read_text())["run_id"]
    (exp.workdir / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(exp.workdir)])
    assert result.exit_code == 0, result.output
    assert (exp.workdir / "report.md").exists()
    assert f"logged to MLflow run {run_id}" in " ".join(result.output.split())
    client = mlflow.MlflowClient(exp.tracking_uri)
    assert "report/report.md" in {a.path for a in client.list_artifacts(run_id, "report")}
    assert client.get_run(run_id).info.run_name == exp.name


def test_students_load_with_auto_classes(smoke_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    exp, _, _ = smoke_run
    folders = list((exp.workdir / "artifacts" / "distill").glob("*/student"))
    assert len(folders) == 2
    model = AutoModelForSequenceClassification.from_pretrained(folders[0])
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    assert model.config.num_hidden_layers == 2
    assert model(**tokenizer(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)


def test_mlflow_has_parent_and_nested_stage_runs(smoke_run):
    exp, _, _ = smoke_run
    mlflow.set_tracking_uri(exp.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[exp.experiment_name], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"data", "teacher", "soft labels", "distill kd_2L (kd)", "evaluate kd_2L", "evaluate teacher"} <= set(children)
    assert all(r.info.status == "FINISHED" for r in children.values())
    distill = children["distill kd_2L (kd)"]
    assert distill.data.params["params.temperature"] == "4.0"
    assert "dev_accuracy" in distill.data.metrics
    assert distill.info.artifact_uri.startswith((exp.workdir / "mlartifacts").as_uri())
    artifacts = mlflow.MlflowClient().list_artifacts(distill.info.run_id, "student")
    assert any(a.path.endswith("model.safetensors") for a in artifacts)
    assert "kd_2L.dev_accuracy" in parents[0].data.metrics


TIMING_FIELDS = ("latency_ms", "throughput", "speedup")


def without_timings(summary: dict) -> dict:
    models = {"teacher": summary["teacher"], **summary["students"]}
    untimed = {name: {k: v for k, v in model.items() if k not in TIMING_FIELDS} for name, model in models.items()}
    return {**summary, "teacher": untimed.pop("teacher"), "students": untimed}


def test_rerun_recomputes_nothing_but_times_every_model_again(smoke_run):
    exp, _, summary = smoke_run
    again = PipelineRunner(exp, Console(width=160))
    timed = []
    time_models = again.time_models
    again.time_models = lambda *args: timed.append(time_models(*args)) or timed[-1]
    rerun = again.run()
    assert again.counts == {"ran": 0, "cached": 8}
    assert without_timings(rerun) == without_timings(summary)
    # The evaluations timed each model alone; the summary's speedups come from one timing of all of them.
    assert set(timed[0]) == {"teacher", *summary["students"]}
    for name, student in rerun["students"].items():
        assert student["latency_ms"] == timed[0][name]["latency_ms"]
        assert student["speedup"] == timed[0]["teacher"]["latency_ms"] / timed[0][name]["latency_ms"]


REPO = Path(__file__).resolve().parents[1]


def dry_run_from(tree: Path, exp) -> str:
    """``run --dry-run`` of the smoke config against the smoke workdir, with the code of ``tree``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "250"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(SMOKE), "--workdir", str(exp.workdir),
                           "--dry-run"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def stage_states(output: str) -> dict[str, str]:
    states = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) >= 3 and cells[1] in ("cached", "to run"):
            states[cells[0]] = cells[1] + (f": {cells[2]}" if cells[2] else "")
    return states


def test_dry_run_lists_every_stage_as_cached(smoke_run):
    exp, _, _ = smoke_run
    states = stage_states(dry_run_from(REPO, exp))
    assert len(states) == 8 and set(states.values()) == {"cached"}


def test_editing_a_methods_loss_reruns_only_its_students(smoke_run, tmp_path):
    import shutil

    exp, _, _ = smoke_run
    tree = tmp_path / "tree"
    for package in ("kd", "stages", "pipeline"):
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    hinton = tree / "kd" / "methods" / "hinton.py"
    source = hinton.read_text()
    assert "p.alpha * soft + (1 - p.alpha) * hard" in source
    hinton.write_text(source.replace("p.alpha * soft + (1 - p.alpha) * hard", "(1 - p.alpha) * hard + p.alpha * soft"))
    states = stage_states(dry_run_from(tree, exp))
    rerun = {name: state for name, state in states.items() if state != "cached"}
    assert set(rerun) == {"distill kd_2L (kd)", "evaluate kd_2L"}, states
    assert "code changed: kd/methods/hinton.py" in rerun["distill kd_2L (kd)"]
    assert "input changed: model" in rerun["evaluate kd_2L"]


def test_the_same_student_trained_again_on_ray_repeats_its_history(smoke_run):
    exp, first_runner, _ = smoke_run
    # report_every changes the stage key but not the training: the same seed must give the same epochs.
    again = load_experiment(SMOKE, ["students.kd_2L.train.report_every=3"], workdir=exp.workdir)
    runner = PipelineRunner(again, Console(width=160))
    runner.run()
    assert runner.counts["ran"] == 2
    name = "distill kd_2L (kd)"
    first, second = ([record for record in r.done[name].result()["history"] if "dev" in record]
                     for r in (first_runner, runner))
    assert len(first) == len(second) >= 1
    for a, b in zip(first, second):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-6)
        assert a["dev"] == pytest.approx(b["dev"], rel=1e-6)


def test_changing_a_student_reruns_only_its_distill_and_evaluate(smoke_run):
    exp, _, _ = smoke_run
    changed = load_experiment(SMOKE, ["students.kd_2L.params.alpha=0.5"], workdir=exp.workdir)
    runner = PipelineRunner(changed, Console(width=160))
    runner.run()
    assert runner.counts == {"ran": 2, "cached": 6}
