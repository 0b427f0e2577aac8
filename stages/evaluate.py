"""Task metrics on dev and test, parameter count, size on disk, and CPU latency: the same harness for the
teacher and every student, run as a Ray task."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from kd.batching import Collator, iterate_frame
from kd.evaluation import evaluate_frame, measure_latency, size_on_disk
from kd.students import count_parameters
from stages.student_training import STUDENT_DIR
from stages.models import load_classifier, load_tokenizer

TEST_PREDICTIONS = "test_predictions.npy"


def model_latency(model, collator: Collator, data_dir: str, batch_size: int, repeats: int, threads: int | None) -> dict:
    """Latency on the first ``batch_size`` test sentences: the same inputs for the teacher and every student."""
    test = pd.read_parquet(Path(data_dir) / "test.parquet")
    rows = next(iterate_frame(test.head(batch_size), batch_size))
    return measure_latency(model, collator.encode(rows), repeats=repeats, threads=threads)


def student_latency(model_dir: str, data_dir: str, cfg) -> dict:
    model = load_classifier(model_dir, cfg.task.num_labels)
    collator = Collator(load_tokenizer(model_dir), cfg.teacher.max_length, regression=cfg.task.task_type == "regression")
    timing = model_latency(model, collator, data_dir, cfg.evaluate.latency_batch_size, cfg.evaluate.latency_repeats,
                           cfg.evaluate.threads)
    return {**timing, "params": count_parameters(model)}


def evaluate_model(model_dir: str, data_dir: str, cfg) -> tuple[dict, np.ndarray]:
    """Dev and test metrics, size and latency of a saved model; also its test logits (for paired tests)."""
    regression = cfg.task.task_type == "regression"
    model = load_classifier(model_dir, cfg.task.num_labels)
    collator = Collator(load_tokenizer(model_dir), cfg.teacher.max_length, regression=regression)
    result: dict = {}
    predictions = {}
    for split in ("dev", "test"):
        frame = pd.read_parquet(Path(data_dir) / f"{split}.parquet")
        result[split], predictions[split] = evaluate_frame(model, collator, frame, cfg.evaluate.batch_size)
    timing = model_latency(model, collator, data_dir, cfg.evaluate.latency_batch_size, cfg.evaluate.latency_repeats,
                           cfg.evaluate.threads)
    result.update(
        params=count_parameters(model),
        size_bytes=size_on_disk(model.save_pretrained),
        latency_ms=timing["latency_ms"],
        throughput=timing["throughput"],
        latency_batch_size=timing["batch_size"],
    )
    return result, predictions["test"]


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

    def latency(self, model_dir: str, data_dir: str, cfg) -> dict:
        return student_latency(model_dir, data_dir, cfg)


def run(cfg, inputs, ctx, out: Path) -> dict:
    result, test_logits = ray.get(ctx.evaluator().evaluate.remote(
        str(inputs["model"].path / STUDENT_DIR), str(inputs["data"].path), cfg))
    np.save(out / TEST_PREDICTIONS, test_logits)
    return result
