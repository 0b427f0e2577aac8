"""Task metrics, model size and CPU latency, measured the same way for teacher and students."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn

from kd.batching import LABEL, TEXT_A, TEXT_B, Collator, iterate_frame
from kd.training import MODEL_INPUTS


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> np.ndarray:
    model.eval()
    outputs = [model(**{k: b[k] for k in MODEL_INPUTS if k in b}).logits.float().numpy() for b in batches]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def length_order(frame) -> np.ndarray:
    """Row positions of ``frame`` from the shortest text (or text pair) to the longest: batches cut in this order
    pad far less."""
    lengths = frame[TEXT_A].astype(str).str.len().to_numpy()
    if TEXT_B in frame.columns:
        lengths = lengths + frame[TEXT_B].astype(str).str.len().to_numpy()
    return np.argsort(lengths, kind="stable")


def predict_frame(model: nn.Module, collator: Collator, frame, batch_size: int = 64) -> np.ndarray:
    """Logits for every row, in the frame's order; computed in length-sorted batches."""
    order = length_order(frame)
    logits = predict_logits(model, (collator.encode(rows) for rows in iterate_frame(frame.iloc[order], batch_size)))
    restored = np.empty_like(logits)
    restored[order] = logits
    return restored


def task_metrics(logits: np.ndarray, labels: np.ndarray, regression: bool = False) -> dict[str, float]:
    """Accuracy, F1 and MCC for classification (F1 of class 1 when binary, macro otherwise); Pearson and
    Spearman for regression."""
    if regression:
        predictions = logits.reshape(-1)
        return {
            "pearson": float(pearsonr(predictions, labels)[0]),
            "spearman": float(spearmanr(predictions, labels)[0]),
        }
    predictions = logits.argmax(-1)
    binary = logits.shape[-1] == 2
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="binary" if binary else "macro")),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def evaluate_frame(model: nn.Module, collator: Collator, frame, batch_size: int = 64) -> tuple[dict[str, float], np.ndarray]:
    logits = predict_frame(model, collator, frame, batch_size)
    return task_metrics(logits, frame[LABEL].to_numpy(), collator.regression), logits


def size_on_disk(save: Callable[[str], None]) -> int:
    """Bytes written by ``save(directory)``: the real footprint of the saved model, whatever its format."""
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def measure_latency(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, float]:
    """Median wall time of one forward pass over ``batch`` on CPU, with torch threads pinned so that teacher
    and students are timed alike."""
    return measure_latencies([model], [batch], warmup, repeats, threads)[0]


@torch.no_grad()
def measure_latencies(
    models: Sequence[nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> list[dict[str, float]]:
    """``measure_latency`` of each model on its batch, the models taken in turn within every repeat.

    Timed one after another, each model gets its own second or two of the machine, and a burst of other work
    (a Ray daemon's, on 2 cores) lands on one model's whole sample: same-architecture students came out 30% apart.
    Interleaved, a burst costs every model a sample or two, which the medians drop, so latencies taken together
    can be divided into speedups.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    inputs = [{k: batch[k] for k in MODEL_INPUTS if k in batch} for batch in batches]
    timings: list[list[float]] = [[] for _ in models]
    try:
        for model in models:
            model.eval()
        for round_index in range(warmup + repeats):
            for model, model_inputs, model_timings in zip(models, inputs, timings, strict=True):
                start = time.perf_counter()
                model(**model_inputs)
                if round_index >= warmup:
                    model_timings.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    results = []
    for model_inputs, model_timings in zip(inputs, timings):
        batch_size = int(model_inputs["input_ids"].shape[0])
        median = float(np.median(model_timings))
        results.append({"latency_ms": 1000 * median, "throughput": batch_size / median, "batch_size": batch_size})
    return results
