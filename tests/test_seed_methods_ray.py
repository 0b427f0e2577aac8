"""The seed methods through the pipeline on local Ray, on the smoke profile's cached data, teacher and kd_2L
student: FastBERT wrapping kd_2L and sweeping exit thresholds, DualTrain with its own WordPiece vocabulary, the
MobileBERT-style bottleneck student, and KD from an ensemble of the teacher and kd_2L. Tiny sizes: one epoch,
narrow students, three thresholds."""

import copy
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console

from kd.batching import TEACHER_LOGITS
from kd.models.fastbert import FastBertForSequenceClassification
from kd.models.mobilebert import BottleneckBertForSequenceClassification
from pipeline.artifacts import Artifact
from pipeline.config import validate
from pipeline.runner import PipelineRunner
from stages.label import TeacherPredictor
from kd.checkpoints import load_classifier, load_tokenizer
from kd.layout import STUDENT_DIR
from kd.layout import TOKENIZER_DIR

from conftest import SMOKE_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

EXPERIMENT = "seed_methods"  # its own MLflow experiment: the smoke experiment's runs stay the smoke run's alone
TRAIN = {"epochs": 1, "batch_size": 32, "learning_rate": 1.0e-3, "report_every": 2}


def smoke_with(workdir, students: list[dict], **fields):
    """The smoke profile with these students (and top-level fields), in the smoke run's workdir."""
    document = yaml.safe_load(SMOKE_CONFIG.read_text())
    document.update(workdir=str(workdir), students=students, mlflow={"experiment": EXPERIMENT}, **fields)
    return validate(document)


def smoke_student(name: str) -> dict:
    """A student entry of the smoke profile exactly as written, so its stages come from the smoke run's cache."""
    return next(s for s in yaml.safe_load(SMOKE_CONFIG.read_text())["students"] if s["name"] == name)


def run(exp) -> tuple[PipelineRunner, dict]:
    runner = PipelineRunner(exp, Console(width=160))
    return runner, runner.run()


def artifacts(workdir, stage: str) -> list[Artifact]:
    return [Artifact(stage, p.name, p) for p in (workdir / "artifacts" / stage).iterdir() if not p.name.startswith(".")]


def first_finished(workdir, stage: str, wanted) -> Artifact:
    """The first artifact of ``stage`` in ``workdir`` that ``wanted(result)`` accepts, by completion time: other
    tests of the session add their own variants of the smoke's stages to the same workdir later, and a folder
    listing's order differs between file systems."""
    return min((a for a in artifacts(workdir, stage) if wanted(a.result())),
               key=lambda a: (a.path / "_COMPLETE").stat().st_mtime)


def distilled(workdir, method: str) -> Artifact:
    return first_finished(workdir, "distill", lambda result: result["method"] == method)


def distill_curves(exp, name: str) -> set[str]:
    mlflow.set_tracking_uri(exp.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[exp.experiment_name], output_format="list")
    (distill,) = [r for r in runs if r.info.run_name.startswith(f"distill {name} ")]
    return set(distill.data.metrics)


def test_fastbert_wraps_a_student_and_sweeps_exit_thresholds(smoke_pipeline):
    smoke, _, smoke_summary = smoke_pipeline
    fastbert = {"name": "fastbert_2L", "method": "fastbert", "student": {"layers": 2},
                "params": {"wrap": "kd_2L", "branch_hidden_size": 16}, "train": TRAIN}
    exp = smoke_with(smoke.workdir, [fastbert, smoke_student("kd_2L")],
                     evaluate={**yaml.safe_load(SMOKE_CONFIG.read_text())["evaluate"], "exit_speeds": [0.0, 0.5, 1.0]})
    runner, summary = run(exp)
    assert runner.counts == {"cached": 6, "ran": 2}  # kd_2L, its soft labels and evaluation come from the smoke run

    student, wrapped = summary["students"]["fastbert_2L"], smoke_summary["students"]["kd_2L"]
    # The backbone and final classifier are frozen: at full depth the model is exactly the student it wraps.
    assert student["test"] == wrapped["test"] and student["dev"] == wrapped["dev"]
    assert student["params"] > wrapped["params"]  # plus the branch
    sweep = student["early_exit"]
    assert [point["speed"] for point in sweep] == [0.0, 0.5, 1.0]
    assert sweep[0]["avg_exit_layer"] == 2 and sweep[-1]["avg_exit_layer"] == 1  # no early exit; all at layer 1
    assert abs(sweep[0]["test_accuracy"] - wrapped["test"]["accuracy"]) <= 1 / 20  # the full path, layer by layer
    assert all(p["latency_ms"] > 0 and p["speedup"] > 0 and 1 <= p["avg_exit_layer"] <= 2 for p in sweep)

    model = load_classifier(str(distilled(exp.workdir, "fastbert").path / STUDENT_DIR), 2)
    assert isinstance(model, FastBertForSequenceClassification) and len(model.branches) == 1  # saved with its branch
    report = (exp.workdir / "report.md").read_text()
    assert "## Early exit (FastBERT)" in report and "| 0.5 |" in report
    assert (exp.workdir / "report_early_exit.png").stat().st_size > 1000
    assert "loss_kl" in distill_curves(exp, "fastbert_2L")
    mlflow.set_tracking_uri(exp.tracking_uri)
    parents = [r for r in mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
               if "mlflow.parentRunId" not in r.data.tags]
    assert any("report/report_early_exit.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(
        r.info.run_id, "report")} for r in parents)


def test_dualtrain_builds_its_vocabulary_and_saves_it_with_the_student(smoke_pipeline):
    smoke, _, _ = smoke_pipeline
    dualtrain = {"name": "dualtrain_2L", "method": "dualtrain", "student": {"layers": 2, "hidden_size": 64},
                 "params": {"vocab_size": 400}, "train": TRAIN}
    exp = smoke_with(smoke.workdir, [dualtrain])
    runner, summary = run(exp)
    assert runner.counts == {"cached": 3, "ran": 3}  # data, teacher, its evaluation; vocabulary, distill, evaluate

    (vocabulary,) = artifacts(exp.workdir, "vocabulary")
    facts = vocabulary.result()
    assert facts["wordpiece_vocab_size"] == 400 and 300 < facts["size"] <= 400 < facts["teacher_size"]
    folder = distilled(exp.workdir, "dualtrain").path / STUDENT_DIR
    tokenizer, built = load_tokenizer(str(folder)), load_tokenizer(str(vocabulary.path / TOKENIZER_DIR))
    assert tokenizer.get_vocab() == built.get_vocab()  # the one vocabulary, built once, travels with the student
    model = load_classifier(str(folder), 2)
    assert model.config.vocab_size == len(tokenizer) == facts["size"] and model.config.hidden_size == 64

    student = summary["students"]["dualtrain_2L"]
    assert student["parameters"]["vocab_size"] == facts["size"]
    teacher = summary["teacher"]["parameters"]
    assert student["compression_embeddings"] == pytest.approx(
        teacher["embedding_params"] / student["parameters"]["embedding_params"]) and student["compression_embeddings"] > 50
    assert student["compression"] == pytest.approx(summary["teacher"]["params"] / student["params"])
    assert "## Parameters: embedding tables and the rest" in (exp.workdir / "report.md").read_text()
    # The shared-projection term needs the dual batch's unit ids: the student read mixed segmentations.
    assert {"loss_hidden", "loss_soft_ce", "loss_ce"} <= distill_curves(exp, "dualtrain_2L")


def test_mobilebert_bottleneck_student_trains_through_ray(smoke_pipeline):
    smoke, _, _ = smoke_pipeline
    mobilebert = {"name": "mobilebert_2L", "method": "mobilebert",
                  "student": {"layers": 2, "hidden_size": 32, "attention_heads": 4},
                  "params": {"intra_size": 64, "intermediate_epochs": 1, "prediction_epochs": 1}, "train": TRAIN}
    exp = smoke_with(smoke.workdir, [mobilebert])
    runner, summary = run(exp)
    assert runner.counts == {"cached": 3, "ran": 2}

    student = summary["students"]["mobilebert_2L"]
    assert student["hidden_size"] == 32 and 0 <= student["test"]["accuracy"] <= 1 and student["compression"] > 10
    model = load_classifier(str(distilled(exp.workdir, "mobilebert").path / STUDENT_DIR), 2)
    assert isinstance(model, BottleneckBertForSequenceClassification) and model.config.intra_size == 64
    history = distilled(exp.workdir, "mobilebert").result()["history"]
    assert [h["phase"] for h in history if "dev" in h] == ["intermediate", "prediction"]
    assert {"loss_hidden", "loss_attention", "loss_soft_ce"} <= distill_curves(exp, "mobilebert_2L")


def test_kd_learns_from_a_two_teacher_ensemble(smoke_pipeline):
    smoke, _, smoke_summary = smoke_pipeline
    kd_student = distilled(smoke.workdir, "kd").path / STUDENT_DIR
    document = yaml.safe_load(SMOKE_CONFIG.read_text())
    # The smoke teacher (the same cached artifact) and, as a second checkpoint, the smoke run's kd_2L student.
    members = [copy.deepcopy(document["teacher"]), {"source": str(kd_student), "max_length": 32, "finetune": "never"}]
    ensemble_student = {"name": "kd_ensemble_2L", "method": "kd", "soft_labels": "ensemble", "student": {"layers": 2},
                        "params": {"temperature": 2.0, "alpha": 0.9}, "train": TRAIN}
    exp = smoke_with(smoke.workdir, [ensemble_student], ensemble={"teachers": members})
    runner, summary = run(exp)
    # Cached: data, teacher (twice: it is member 1), the teacher's evaluation. New: member 2, the ensemble's
    # evaluation, its soft labels, the student's distill and evaluate.
    assert runner.counts == {"cached": 4, "ran": 5}

    ensemble = summary["ensemble"]
    assert ensemble["teachers"][0]["test"] == smoke_summary["teacher"]["test"]
    assert ensemble["teachers"][1]["test"] == smoke_summary["students"]["kd_2L"]["test"]
    assert 0 <= ensemble["test"]["accuracy"] <= 1 and summary["students"]["kd_ensemble_2L"]["soft_labels"] == "ensemble"
    report = (exp.workdir / "report.md").read_text()
    assert "## Teacher ensemble" in report and "| kd_ensemble_2L | kd |" in report

    (labels,) = [a for a in artifacts(exp.workdir, "label") if a.result().get("teachers") == 2]
    assert labels.result()["temperature"] == 2.0
    rows = pd.read_parquet(labels.path / "data").head(8)
    batch = {column: rows[column].to_numpy() for column in rows.columns if column != TEACHER_LOGITS}
    teacher_dir = str(first_finished(exp.workdir, "teacher", lambda result: result.get("fine_tuned")).path / STUDENT_DIR)
    threads = torch.get_num_threads()
    try:
        member_logits = [torch.from_numpy(TeacherPredictor(d, 2, 32, 1).logits(dict(batch)))
                         for d in (teacher_dir, str(kd_student))]
    finally:
        torch.set_num_threads(threads)  # the predictor pins its process to one thread, as a label actor
    member_probabilities = [torch.softmax(logits / 2.0, -1) for logits in member_logits]
    stored = torch.softmax(torch.from_numpy(np.stack(rows[TEACHER_LOGITS].to_numpy())) / 2.0, -1)
    torch.testing.assert_close(stored, torch.stack(member_probabilities).mean(0), atol=1e-5, rtol=1e-4)
    assert json.loads((exp.workdir / "summary.json").read_text())["ensemble"] == ensemble
