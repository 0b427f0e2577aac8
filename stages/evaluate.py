"""Task metrics on dev and test, parameter count, size on disk, and CPU latency: the same harness for the
teacher and every student, run as a Ray task."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from pydantic import Field

from kd.batching import LABEL, Collator, iterate_frame
from kd.ensemble import ensemble_logits
from kd.evaluation import (evaluate_frame, length_order, measure_latencies, measure_latency, size_on_disk,
                           task_metrics)
from kd.models.fastbert import EarlyExit, FastBertForSequenceClassification, speed_sweep
from kd.students import count_parameters
from stages.config import EnsembleConfig, EvaluateConfig, StageConfig, TaskConfig, TeacherConfig
from stages.label import member_inputs
from kd.layout import STUDENT_DIR
from kd.checkpoints import load_classifier, load_tokenizer

TEST_PREDICTIONS = "test_predictions.npy"


class Config(StageConfig):
    """``exit_speeds``: the early-exit thresholds this evaluation sweeps, empty for a model that does not exit
    early (a plain classifier's evaluation does not depend on them)."""

    task: TaskConfig
    teacher: TeacherConfig
    evaluate: EvaluateConfig
    exit_speeds: list[float] = Field(default_factory=list)


class EnsembleEvaluationConfig(Config):
    ensemble: EnsembleConfig


def model_collator(model_dir: str, cfg) -> Collator:
    """Batches for a saved model: its own tokenizer (a student may have its own vocabulary), the teacher's length."""
    return Collator(load_tokenizer(model_dir), cfg.teacher.max_length, regression=cfg.task.task_type == "regression")


def read_split(data_dir: str, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(data_dir) / f"{split}.parquet")


def latency_batch(collator: Collator, test: pd.DataFrame, batch_size: int) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` test sentences: the same inputs for the teacher and every student."""
    return collator.encode(next(iterate_frame(test.head(batch_size), batch_size)))


def exit_paths(model: FastBertForSequenceClassification, speeds: list[float]) -> list[EarlyExit]:
    """FastBERT's early-exit path at each of ``speeds``, callable as a plain model."""
    return [EarlyExit(model, speed) for speed in speeds]


def time_saved_models(model_dirs: list[str], data_dir: str, cfg, early_exit: bool = False) -> list[dict]:
    """Latency and parameters of each saved model, all timed together (``kd.evaluation.measure_latencies``,
    interleaved), which is what a speedup, one model's latency over another's, needs. With ``early_exit``, a
    FastBERT model's early-exit path at each exit speed is timed alongside (``early_exit_latency_ms``)."""
    test = read_split(data_dir, "test")
    entries: list[tuple[int, torch.nn.Module, dict]] = []  # (index of the model, what is timed, its batch)
    results: list[dict] = []
    for index, model_dir in enumerate(model_dirs):
        model = load_classifier(model_dir, cfg.task.num_labels)
        batch = latency_batch(model_collator(model_dir, cfg), test, cfg.evaluate.latency_batch_size)
        paths = (exit_paths(model, cfg.evaluate.exit_speeds)
                 if early_exit and isinstance(model, FastBertForSequenceClassification) else [])
        results.append({"params": count_parameters(model), **({"early_exit_latency_ms": []} if paths else {})})
        entries += [(index, module, batch) for module in [model, *paths]]
    timings = measure_latencies([module for _, module, _ in entries], [batch for *_, batch in entries],
                                repeats=cfg.evaluate.latency_repeats, threads=cfg.evaluate.threads)
    for (index, module, _), timing in zip(entries, timings, strict=True):
        if isinstance(module, EarlyExit):
            results[index]["early_exit_latency_ms"].append(timing["latency_ms"])
        else:
            results[index].update(timing)
    return results


def early_exit_sweep(model: FastBertForSequenceClassification, collator: Collator, frames: dict[str, pd.DataFrame],
                     cfg) -> list[dict]:
    """FastBERT's adaptive inference at each of ``evaluate.exit_speeds`` over the dev and test ``frames``: dev and
    test accuracy, the mean exit layer on test, and the latency of the early-exit path on the same batch and
    harness as every ``latency_ms``."""
    sweeps = {}
    for split, frame in frames.items():
        frame = frame.iloc[length_order(frame)]
        batches = [collator.encode(rows) for rows in iterate_frame(frame, cfg.evaluate.batch_size)]
        sweeps[split] = speed_sweep(model, batches, frame[LABEL].to_numpy(), cfg.exit_speeds)
    paths = exit_paths(model, cfg.exit_speeds)
    batch = latency_batch(collator, frames["test"], cfg.evaluate.latency_batch_size)
    latencies = [timing["latency_ms"] for timing in measure_latencies(
        paths, [batch] * len(paths), repeats=cfg.evaluate.latency_repeats, threads=cfg.evaluate.threads)]
    return [{"speed": test["speed"], "dev_accuracy": dev["accuracy"], "test_accuracy": test["accuracy"],
             "avg_exit_layer": test["avg_exit_layer"], "latency_ms": latency}
            for dev, test, latency in zip(sweeps["dev"], sweeps["test"], latencies, strict=True)]


def evaluate_model(model_dir: str, data_dir: str, cfg) -> tuple[dict, np.ndarray]:
    """Dev and test metrics, size and latency of a saved model; also its test logits (for paired tests). A
    FastBERT model is also swept over early-exit thresholds (``early_exit``)."""
    model = load_classifier(model_dir, cfg.task.num_labels)
    collator = model_collator(model_dir, cfg)
    frames = {split: read_split(data_dir, split) for split in ("dev", "test")}
    result: dict = {}
    predictions = {}
    for split, frame in frames.items():
        result[split], predictions[split] = evaluate_frame(model, collator, frame, cfg.evaluate.batch_size)
    timing = measure_latency(model, latency_batch(collator, frames["test"], cfg.evaluate.latency_batch_size),
                             repeats=cfg.evaluate.latency_repeats, threads=cfg.evaluate.threads)
    result.update(
        params=count_parameters(model),
        size_bytes=size_on_disk(model.save_pretrained),
        latency_ms=timing["latency_ms"],
        throughput=timing["throughput"],
        latency_batch_size=timing["batch_size"],
    )
    if cfg.exit_speeds and isinstance(model, FastBertForSequenceClassification):
        result["early_exit"] = early_exit_sweep(model, collator, frames, cfg)
    return result, predictions["test"]


def evaluate_ensemble(model_dirs: list[str], max_lengths: list[int], data_dir: str, cfg) -> tuple[dict, np.ndarray]:
    """Dev and test metrics of each teacher of an ensemble and of the ensemble itself, which predicts
    argmax p̄, p̄ the members' probabilities averaged (at T = 1); also the ensemble's test logits log p̄."""
    frames = {split: read_split(data_dir, split) for split in ("dev", "test")}
    logits: dict[str, list[np.ndarray]] = {split: [] for split in frames}
    members = []
    for model_dir, max_length in zip(model_dirs, max_lengths, strict=True):
        model = load_classifier(model_dir, cfg.task.num_labels)
        collator = Collator(load_tokenizer(model_dir), max_length)
        member = {}
        for split, frame in frames.items():
            member[split], split_logits = evaluate_frame(model, collator, frame, cfg.evaluate.batch_size)
            logits[split].append(torch.from_numpy(split_logits))
        members.append(member)
    result: dict = {"members": members}
    ensemble = {split: ensemble_logits(split_logits).numpy() for split, split_logits in logits.items()}
    for split, frame in frames.items():
        result[split] = task_metrics(ensemble[split], frame[LABEL].to_numpy())
    return result, ensemble["test"]


@ray.remote(num_cpus=0)
class Evaluator:
    """One warm process for every evaluation of a run: a fresh Ray task would import torch and transformers
    again each time (about 8 s here). It reserves no CPU so that it never blocks training; evaluations run
    between training stages, when the node is otherwise idle."""

    def __init__(self, threads: int | None):
        # Ray pins a worker to one thread per reserved CPU; predicting 2k sentences on one thread wastes the node.
        torch.set_num_threads(threads or os.cpu_count() or 1)

    def evaluate(self, model_dir: str, data_dir: str, cfg) -> tuple[dict, np.ndarray]:
        return evaluate_model(model_dir, data_dir, cfg)

    def time_models(self, model_dirs: list[str], data_dir: str, cfg, early_exit: bool = False) -> list[dict]:
        return time_saved_models(model_dirs, data_dir, cfg, early_exit)

    def evaluate_ensemble(self, model_dirs: list[str], max_lengths: list[int], data_dir: str,
                          cfg) -> tuple[dict, np.ndarray]:
        return evaluate_ensemble(model_dirs, max_lengths, data_dir, cfg)


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    result, test_logits = ray.get(ctx.evaluator().evaluate.remote(
        str(inputs["model"].path / STUDENT_DIR), str(inputs["data"].path), cfg))
    np.save(out / TEST_PREDICTIONS, test_logits)
    return result


def run_ensemble(cfg: EnsembleEvaluationConfig, inputs, ctx, out: Path) -> dict:
    """The teacher ensemble's evaluation: inputs ``data`` and its members' teacher artifacts (``member_*``)."""
    model_dirs = [str(member.path / STUDENT_DIR) for member in member_inputs(inputs)]
    result, test_logits = ray.get(ctx.evaluator().evaluate_ensemble.remote(
        model_dirs, [t.max_length for t in cfg.ensemble.teachers], str(inputs["data"].path), cfg))
    np.save(out / TEST_PREDICTIONS, test_logits)
    return result
