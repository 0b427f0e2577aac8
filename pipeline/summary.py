"""summary.json: built from a run's stages, written to its workdir and read back (the schema of the file is
``pipeline.summary_schema``); its terminal table; and the report written from a workdir's summaries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from rich.table import Table
from transformers import AutoConfig, AutoModelForSequenceClassification

from kd.students import parameter_counts
from kd.worker import selection_metric
from pipeline.generation import generation_table, write_generation_report
from pipeline.report import ReportPaths, report_table, write_report
from pipeline.report_stats import training_cost
from pipeline.summary_schema import (EnsembleMember, EnsembleSummary, GenerationSummary, Init, StudentSummary, Summary,
                                     TeacherSummary)
from stages.evaluate import TEST_PREDICTIONS
from kd.layout import STUDENT_DIR

SIZE_FIELDS = ("params", "size_bytes", "latency_ms", "throughput")
SUMMARY_FILE = "summary.json"
SEED_SUMMARIES = "summaries"




def parameter_breakdown(model_dir: Path) -> dict:
    """A saved model's parameters in its embedding tables and outside them, its vocabulary and width, from its
    config alone: the model is built on the meta device, so no weights are read or allocated."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    factorised = getattr(config, "embedding_size", config.hidden_size) != config.hidden_size
    return {**parameter_counts(model), "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "embedding_size": config.embedding_size if factorised else None}


def ratio(teacher: float, student: float) -> float:
    return teacher / max(student, 1)


def ensemble_summary(exp, prepared: dict) -> EnsembleSummary:
    """Each teacher of the ensemble and the ensemble itself on dev and test."""
    result = prepared["ensemble_eval"].result()
    teachers = [EnsembleMember(source=member.source, seed=member.train.seed, dev=metrics["dev"], test=metrics["test"])
                for member, metrics in zip(exp.ensemble.teachers, result["members"], strict=True)]
    return EnsembleSummary(teachers=teachers, dev=result["dev"], test=result["test"])


def with_timing(result: dict, timing: dict | None) -> dict:
    """An evaluation's result with its latency figures replaced by ``timing`` (``stages.evaluate.time_saved_models``
    with ``early_exit``), when there is one."""
    if timing is None:
        return result
    result = {**result, "latency_ms": timing["latency_ms"], "throughput": timing["throughput"]}
    if "early_exit" in result:
        result["early_exit"] = [{**point, "latency_ms": latency}
                                for point, latency in zip(result["early_exit"], timing["early_exit_latency_ms"], strict=True)]
    return result


def build_summary(exp, evaluations: dict, distills: dict, prepared: dict, train_rows: dict[str, int],
                  timings: dict[str, dict] | None = None) -> Summary:
    """``evaluations`` and ``distills``: stage artifacts by student name (evaluations also has the teacher);
    ``train_rows``: the rows each student trained on (the augmented corpus's, for one trained on it); ``timings``:
    fresh latencies by name (the teacher's under ``teacher``), which replace those of the evaluations."""
    timings = timings or {}
    teacher_eval = with_timing(evaluations["teacher"].result(), timings.get("teacher"))
    teacher_parameters = parameter_breakdown(prepared["teacher"].path / STUDENT_DIR)
    teacher = TeacherSummary(source=exp.teacher.source,
                             fine_tuned=prepared["teacher"].result().get("fine_tuned", False),
                             dev=teacher_eval["dev"], test=teacher_eval["test"],
                             **{k: teacher_eval[k] for k in SIZE_FIELDS}, parameters=teacher_parameters)
    students = {}
    for spec in exp.students:
        result = with_timing(evaluations[spec.name].result(), timings.get(spec.name))
        epochs = [h for h in distills[spec.name].result().get("history", []) if "dev" in h]
        parameters = parameter_breakdown(distills[spec.name].path / STUDENT_DIR)
        # A width the entry leaves to the method (MobileBERT's bottleneck) is the saved model's.
        width = parameters["hidden_size"] if parameters["hidden_size"] != teacher_parameters["hidden_size"] else None
        early_exit = None
        if "early_exit" in result:
            early_exit = [{**point, "speedup": teacher.latency_ms / point["latency_ms"]}
                          for point in result["early_exit"]]
        method = spec.method_object()
        students[spec.name] = StudentSummary(
            method=spec.method,
            family=method.family,
            # A gold-label student that starts from a general distillation has learned from the teacher already.
            baseline=method.is_baseline() and spec.student.general_source is None,
            layers=spec.student.layers,
            init=Init(from_=spec.student.init_from,
                      layers=method.resolve_shape(spec.student).init),
            selected_epoch=distills[spec.name].result().get("selected_epoch"),
            hidden_size=spec.student.hidden_size or width,
            embedding_size=parameters["embedding_size"],
            soft_labels=spec.soft_labels,
            dev=result["dev"],
            test=result["test"],
            **{k: result[k] for k in SIZE_FIELDS},
            parameters=parameters,
            compression=teacher.params / result["params"],
            compression_embeddings=ratio(teacher_parameters["embedding_params"], parameters["embedding_params"]),
            compression_non_embedding=ratio(teacher_parameters["non_embedding_params"],
                                            parameters["non_embedding_params"]),
            speedup=teacher.latency_ms / result["latency_ms"],
            teacher_signals=method.teacher_signals(),
            epochs=len(epochs),
            epoch_seconds=float(np.mean([h["epoch_seconds"] for h in epochs])) if epochs else None,
            train_rows=train_rows[spec.name],
            evaluate_dir=evaluations[spec.name].path,
            early_exit=early_exit,
        )
    return Summary(experiment=exp.name, metric=selection_metric(exp.task.task_type == "regression"),
                   data_dir=prepared["data"].path, teacher=teacher, students=students,
                   ensemble=ensemble_summary(exp, prepared) if "ensemble_eval" in prepared else None)


def summary_table(summary: Summary) -> Table:
    metric = summary.metric
    table = Table(title=f"{summary.experiment}: students against the teacher ({metric})")
    for column in ("model", "method", "layers", "params", "compression", f"dev {metric}", f"test {metric}",
                   "latency ms", "speedup", "s/epoch"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    teacher = summary.teacher
    table.add_row("teacher", "-", "-", f"{teacher.params / 1e6:.1f}M", "1.0×", f"{teacher.dev[metric]:.4f}",
                  f"{teacher.test[metric]:.4f}", f"{teacher.latency_ms:.1f}", "1.0×", "-", style="bold")
    if summary.ensemble is not None:
        ensemble = summary.ensemble
        table.add_row(f"ensemble of {len(ensemble.teachers)}", "-", "-", "-", "-", f"{ensemble.dev[metric]:.4f}",
                      f"{ensemble.test[metric]:.4f}", "-", "-", "-", style="bold")
    rows = sorted(summary.students.items(), key=lambda item: -item[1].dev[metric])
    for name, s in rows:
        table.add_row(name, s.method, str(s.layers), f"{s.params / 1e6:.1f}M", f"{s.compression:.1f}×",
                      f"{s.dev[metric]:.4f}", f"{s.test[metric]:.4f}", f"{s.latency_ms:.1f}",
                      f"{s.speedup:.1f}×", f"{s.epoch_seconds:.0f}" if s.epoch_seconds else "-")
    return table


def write_summaries(workdir: Path, summaries: Sequence[Summary]) -> Path:
    """Each seed's summary as ``summaries/seed-N.json`` and the first seed's as ``summary.json``, whose path this
    returns."""
    path = workdir / SUMMARY_FILE
    summaries[0].write(path)
    per_seed_dir = workdir / SEED_SUMMARIES
    if per_seed_dir.exists():
        shutil.rmtree(per_seed_dir)  # an earlier run with more seeds would otherwise leave its extra files behind
    per_seed_dir.mkdir()
    for offset, summary in enumerate(summaries):
        summary.write(per_seed_dir / f"seed-{offset}.json")
    return path


def load_summaries(workdir: Path) -> list[Summary | GenerationSummary]:
    """Per-seed summaries of a run (``summaries/seed-N.json``), or its single ``summary.json``. Raises
    ``FileNotFoundError`` (``SummaryOutdated`` for a file of another schema) with what to run."""
    per_seed = sorted((workdir / SEED_SUMMARIES).glob("seed-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    paths = per_seed or [workdir / SUMMARY_FILE]
    if not paths[0].exists():
        raise FileNotFoundError(f"{workdir} holds no {SUMMARY_FILE}: run `python -m pipeline run` first")
    return [Summary.read(path) for path in paths]


def write_workdir_report(workdir: Path, summaries: Sequence[Summary | GenerationSummary]) -> list[Path]:
    """Write the report of a workdir's summaries: its files, ``report.md`` first."""
    if isinstance(summaries[0], GenerationSummary):
        return write_generation_report(workdir, summaries)
    return write_task_report(workdir, summaries).files()


def workdir_table(summaries: Sequence[Summary | GenerationSummary]) -> Table:
    """The report's table for the terminal."""
    return generation_table(summaries) if isinstance(summaries[0], GenerationSummary) else report_table(summaries)


def write_task_report(workdir: Path, summaries: Sequence[Summary]) -> ReportPaths:
    """A classification or regression task's report: collect predictions, labels and training costs named by the
    summaries, and write it."""
    first = summaries[0]
    test_labels = pd.read_parquet(first.data_dir / "test.parquet")["label"].to_numpy()
    predictions = {name: [np.load(s.students[name].evaluate_dir / TEST_PREDICTIONS) for s in summaries]
                   for name in first.students}
    training = {}
    for name, student in first.students.items():
        seconds = [s.students[name].epoch_seconds for s in summaries if s.students[name].epoch_seconds]
        training[name] = training_cost(float(np.mean(seconds)) if seconds else 0.0, student.train_rows,
                                       student.epochs, student.teacher_signals)
    return write_report(workdir, summaries, predictions, test_labels, training)
