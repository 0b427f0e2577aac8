"""One student's training run, free of Ray: what a Ray Train worker, an in-process Tune trial and the benchmarks
all execute.

The run talks to its surroundings through ``TrainIO``: where training rows and dev rows come from, where a restart
resumes from, and where metrics and checkpoints go. ``stages.distill.ShardIO`` reads the worker's share of the
Parquet and reports to Ray Train; ``LocalIO`` reads Parquet in the current process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol

import numpy as np
import pandas as pd
import torch

from kd.attention import SCORES_ATTENTION
from kd.batching import TEXT_A, TEXT_B, Collator, iterate_frame
from kd.methods import get_method
from kd.methods.base import task_dev_metrics, task_selection_metric
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings, phase_epochs
from kd.layout import BEST_DIR, HISTORY_FILE, STUDENT_DIR
from kd.checkpoints import load_classifier, load_tokenizer

FAULT_ENV = "KD_FAULT_AT_STEP"
# Several of the controller's polls (every 0.5 s, pipeline.ray_session) even on a loaded machine.
FAULT_GRACE_S = 3.0
Rows = Mapping[str, np.ndarray]


class TrainIO(Protocol):
    rank: int
    world: int

    def epoch_chunks(self, rows_per_chunk: int, seed: int) -> Iterable[Rows]: ...
    def dev_rows(self, batch_size: int) -> Iterable[Rows]: ...
    def restore(self) -> ContextManager[Path | None]: ...
    def report(self, metrics: dict, directory: Path | None) -> None: ...
    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module: ...
    def device(self) -> torch.device: ...
    def progress(self, line: str) -> None: ...


def shuffled_chunks(frame: pd.DataFrame, rows_per_chunk: int, seed: int) -> Iterator[Rows]:
    """The rows in the epoch's seeded order: the same seed gives the same order, however the rows arrived."""
    return iterate_frame(frame.iloc[np.random.default_rng(seed).permutation(len(frame))], rows_per_chunk)


class FrameData:
    """A worker's data held as pandas frames: its share of the train split (``train``), reshuffled by each epoch's
    seed, and the whole dev split (``dev``)."""

    train: pd.DataFrame
    dev: pd.DataFrame

    def read(self, train_path: str | Path, dev_path: str | Path, rank: int = 0, world: int = 1) -> None:
        """Read both Parquet files once. With ``world`` workers this one keeps rows rank, rank + world, …, as many as
        every other worker keeps (the remainder is dropped): data-parallel workers step in lockstep, so each must
        have as many batches."""
        train = pd.read_parquet(train_path)
        self.train = train.iloc[rank::world].iloc[: len(train) // world] if world > 1 else train
        self.dev = pd.read_parquet(dev_path)

    def epoch_chunks(self, rows_per_chunk: int, seed: int) -> Iterator[Rows]:
        return shuffled_chunks(self.train, rows_per_chunk, seed)

    def dev_rows(self, batch_size: int) -> Iterator[Rows]:
        return iterate_frame(self.dev, batch_size)


class LocalIO(FrameData):
    """In this process: Parquet read with pandas, shuffled per epoch; reports go to a callback."""

    rank, world = 0, 1

    def __init__(self, train_path: Path, dev_path: Path,
                 report: Callable[[dict, Path | None], None] = lambda metrics, directory: None,
                 resume_from: Callable[[], ContextManager[Path | None]] = lambda: nullcontext(None)):
        self.read(train_path, dev_path)
        self._report = report
        self._resume_from = resume_from

    def restore(self) -> ContextManager[Path | None]:
        return self._resume_from()

    def report(self, metrics: dict, directory: Path | None) -> None:
        self._report(metrics, directory)

    def wrap(self, module, device):
        return module.to(device)

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def progress(self, line: str) -> None:
        """Progress lines have no one to go to in this process (``verbose`` prints them)."""


@contextmanager
def as_path(manager) -> Iterator[Path]:
    with manager as directory:
        yield Path(directory)


def train_job(*, method: str, params: dict, shape: dict | None, settings: TrainSettings, teacher: str | None,
              init_model: str | None, tokenizer: str, max_length: int, num_labels: int, regression: bool,
              train_rows: int, train_path: str, torch_threads: int, vocabulary: str | None = None,
              layer_source: str | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data so it crosses to Ray workers cheaply. ``tokenizer`` is the
    teacher's; ``vocabulary`` a folder holding the student's own tokenizer, built once by the pipeline
    (``Method.vocabulary_key``); ``layer_source`` the checkpoint a student's layers are copied from when it is
    not the teacher (``student.init_from``: the pre-trained checkpoint, a general distillation, any checkpoint)."""
    return {"layer_source": layer_source,
        "method": method, "params": params, "shape": shape, "settings": settings.model_dump(), "teacher": teacher,
        "init_model": init_model, "tokenizer": tokenizer, "vocabulary": vocabulary, "max_length": max_length,
        "num_labels": num_labels,
        "regression": regression, "train_rows": train_rows, "train_path": train_path, "torch_threads": torch_threads,
        **fault_injection(),
    }


def fault_injection() -> dict[str, Any]:
    """Fault injection for the fault-tolerance tests, read on the driver (``KD_FAULT_AT_STEP``): rank 0 of the job
    dies once, at that step; the marker file keeps the restarted worker going."""
    return {"fault_at_step": int(os.environ.get(FAULT_ENV, "0")),
            "fault_marker": str(Path(tempfile.gettempdir()) / f"kd-fault-{uuid.uuid4().hex}")}


def fail_if_injected(job: Mapping[str, Any], step: int, rank: int) -> None:
    """Die as a lost node would (no exception, no cleanup) at the job's fault step, once.

    It waits ``FAULT_GRACE_S`` first: Ray Train's controller collects a worker's last report (and so its
    checkpoint) only when it next polls the worker, and a worker that dies before that poll takes the checkpoint
    with it. The tests ask whether a restart resumes from a checkpoint the controller holds, not how a report
    races a crash.
    """
    fault_step = job.get("fault_at_step", 0)
    if fault_step and rank == 0 and step >= fault_step:
        marker = Path(job["fault_marker"])
        if not marker.exists():
            marker.touch()
            time.sleep(FAULT_GRACE_S)
            os._exit(1)


def dev_metrics(model: torch.nn.Module, collator: Collator, io: TrainIO, regression: bool, batch_size: int) -> dict:
    """A classifier's task metrics on the dev rows; ``train_student`` asks the method (``Method.dev_metrics``),
    whose default this is."""
    return task_dev_metrics(model, collator, io.dev_rows(batch_size), regression)


def corpus_texts(path: str) -> Iterator[str]:
    """Every text of a training corpus (both sides of pairs), read when first iterated.

    Each worker reads the whole corpus, not its shard, so a vocabulary built from it is the same on every
    worker.
    """
    frame = pd.read_parquet(path)
    for column in (TEXT_A, TEXT_B):
        if column in frame.columns:
            yield from frame[column].astype(str)


def build_distiller(job: dict[str, Any], io: TrainIO) -> tuple[Distiller, Collator]:
    method = get_method(job["method"])(job["params"])
    settings = TrainSettings.model_validate(job["settings"])
    if job["vocabulary"]:
        method.vocabulary = load_tokenizer(job["vocabulary"])
    teacher_tokenizer = load_tokenizer(job["tokenizer"])
    tokenizer = method.student_tokenizer(teacher_tokenizer, corpus_texts(job["train_path"]))
    teacher = None
    if job["teacher"] is not None:
        teacher = method.load_model(job["teacher"], job["num_labels"], attentions="attentions" in method.online_signals)
    if job["shape"] is None:
        student = load_classifier(job["init_model"], job["num_labels"])
    else:
        layers = teacher if job["layer_source"] is None else method.load_model(job["layer_source"], job["num_labels"])
        student = method.build_student(layers, StudentShape.model_validate(job["shape"]))
    if "attentions" in method.student_outputs:
        student.set_attn_implementation(SCORES_ATTENTION)
    if not method.needs_teacher_online:
        teacher = None  # it was only needed to initialise the student; free its memory
    steps = math.ceil(job["train_rows"] / io.world / settings.batch_size)
    device = io.device()
    distiller = Distiller(method, student, teacher, settings, steps, device,
                          wrap=lambda module: io.wrap(module, device))
    collator = method.collator(tokenizer, teacher_tokenizer, job["max_length"], job["regression"],
                               seed=settings.seed + io.rank)
    return distiller, collator


def progress_line(distiller: Distiller, metrics: dict) -> str:
    phase = distiller.phases[distiller.progress.phase_index]
    within = distiller.progress.global_step - distiller.progress.epoch_start_step
    return (f"[{phase.name}] epoch {distiller.progress.epoch + 1}/{phase_epochs(phase, distiller.settings)} "
            f"step {within}/{distiller.steps_per_epoch} loss {metrics.get('loss/total', float('nan')):.4f}")


def save_student(distiller: Distiller, collator: Collator, directory: Path) -> None:
    distiller.student.save_pretrained(directory)
    collator.tokenizer.save_pretrained(directory)


def save_checkpoint(distiller: Distiller, collator: Collator, directory: Path, best: Path) -> None:
    """Resumable trainer state, the student as it stands, and the best student so far (``BEST_DIR``), each
    loadable by ``from_pretrained``."""
    distiller.save_state(directory)
    save_student(distiller, collator, directory / STUDENT_DIR)
    if best.exists():
        shutil.copytree(best, directory / BEST_DIR)
    (directory / HISTORY_FILE).write_text(json.dumps(distiller.progress.history))


def selection_metric(regression: bool, method: str | None = None) -> str:
    """The dev metric that picks a run's checkpoint: the method's (``Method.selection_metric``; its default, and
    without a method, the first that ``kd.evaluation.task_metrics`` reports)."""
    if method is None:
        return task_selection_metric(regression)
    return get_method(method)().selection_metric(regression)


def selected_epoch(history: list[dict]) -> int | None:
    """The epoch whose student a run keeps: the last one marked ``selected`` as the best on dev so far."""
    chosen = [record["epoch"] for record in history if record.get("selected")]
    return chosen[-1] if chosen else None


def kept_student(checkpoint: Path) -> Path:
    """The student a finished run keeps: the best on dev in its final phase, or the last one when no epoch of it
    scored (a dev metric that is NaN throughout)."""
    return checkpoint / BEST_DIR if (checkpoint / BEST_DIR).exists() else checkpoint / STUDENT_DIR


def train_student(job: dict[str, Any], io: TrainIO, verbose: bool = True) -> Distiller:
    """Train every phase of the job's method, reporting dev metrics and a checkpoint after each epoch."""
    torch.set_num_threads(job["torch_threads"])
    torch.manual_seed(job["settings"]["seed"])
    distiller, collator = build_distiller(job, io)
    settings = distiller.settings
    # The best student on dev so far, in the final phase only: an earlier phase (TinyBERT's intermediate layers)
    # has no trained prediction layer to judge.
    best = Path(tempfile.mkdtemp(prefix="kd-best-")) / BEST_DIR
    with io.restore() as directory:
        if directory is not None:
            distiller.load_state(directory)
            distiller.progress.history = json.loads((directory / HISTORY_FILE).read_text())
            distiller.progress.history.append({"event": "restored", "step": distiller.progress.global_step})
            if (directory / BEST_DIR).exists():
                shutil.copytree(directory / BEST_DIR, best)
    rank0 = io.rank == 0
    if not distiller.progress.history:  # a restored run's history already starts with this record
        distiller.progress.history.append(
            {"event": "precision", "precision": distiller.precision, "reason": distiller.precision_reason})
    if rank0 and verbose:
        print(f"precision {distiller.precision_reason}", flush=True)
    method = distiller.method
    metric = method.selection_metric(job["regression"])
    final_phase = len(distiller.phases) - 1

    def on_progress(metrics: dict) -> None:
        distiller.progress.history.append(metrics)
        if rank0:
            line = progress_line(distiller, metrics)
            io.progress(line)
            if verbose:
                print(line, flush=True)
        fail_if_injected(job, distiller.progress.global_step, io.rank)

    while not distiller.finished:
        phase = distiller.phases[distiller.progress.phase_index].name
        epochs_done = sum(1 for record in distiller.progress.history if "dev" in record) + 1
        # Every draw of the epoch follows (seed, rank, epoch), so a rerun, or a run resumed mid-way, sees the data in
        # the same order.
        epoch_seed = int(np.random.SeedSequence([settings.seed, io.rank, epochs_done]).generate_state(1)[0])
        rng = np.random.default_rng(epoch_seed)
        chunks = io.epoch_chunks(settings.batch_size * settings.bucket_batches, epoch_seed)
        batches = (collator(rows) for rows in method.training_batches(chunks, settings.batch_size, rng))
        phase_index = distiller.progress.phase_index
        started = time.perf_counter()
        losses = distiller.run_epoch(batches, on_progress)
        epoch_seconds = time.perf_counter() - started
        dev = method.dev_metrics(distiller.student, collator, io.dev_rows(settings.batch_size * 2), job["regression"])
        scored = [record["dev"][metric] for record in distiller.progress.history
                  if record.get("selected") is not None]
        improved = phase_index == final_phase and (not scored or dev[metric] > max(scored))
        if improved and rank0:
            shutil.rmtree(best, ignore_errors=True)
            save_student(distiller, collator, best)
        distiller.progress.history.append({"phase": phase, "epoch": epochs_done, "step": distiller.progress.global_step,
                                           "epoch_seconds": epoch_seconds, **losses, "dev": dev,
                                           **({"selected": improved} if phase_index == final_phase else {})})
        final_phase_epochs = sum(1 for record in distiller.progress.history if "selected" in record)
        metrics = {"epoch": epochs_done, "final_phase_epoch": final_phase_epochs,
                   "step": distiller.progress.global_step, "epoch_seconds": epoch_seconds,
                   **losses, **{f"dev_{name}": value for name, value in dev.items()}}
        with tempfile.TemporaryDirectory() as scratch:
            if rank0:
                save_checkpoint(distiller, collator, Path(scratch), best)
            io.report(metrics, Path(scratch) if rank0 else None)
    shutil.rmtree(best.parent, ignore_errors=True)
    return distiller
