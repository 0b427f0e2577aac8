"""Ray Train: one TorchTrainer per student, training a registered method from cached or online teacher signals.

The teacher stage reuses this with the ``finetune`` method to fine-tune the teacher itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kd.batching import Collator, length_bucketed
from kd.evaluation import predict_logits, task_metrics
from kd.methods import get_method
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings
from stages.models import load_classifier, load_tokenizer

STUDENT_DIR = "student"
HISTORY_FILE = "history.json"


def _dev_metrics(model, collator: Collator, regression: bool, batch_size: int) -> dict[str, float]:
    shard = ray.train.get_dataset_shard("dev")
    labels, encoded = [], []
    for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        labels.append(rows["label"])
        encoded.append(collator.encode(rows))
    logits = predict_logits(model, encoded)
    return task_metrics(logits, np.concatenate(labels), regression)


def _log_progress(distiller: Distiller, metrics: dict, rank0: bool) -> None:
    """Keep the step-level curve for MLflow and print a progress line that Ray forwards to the driver."""
    distiller.progress.history.append(metrics)
    if rank0:
        phase = distiller.phases[distiller.progress.phase_index]
        epochs = phase.epochs if phase.epochs is not None else distiller.settings.epochs
        within = distiller.progress.global_step - distiller.progress.epoch_start_step
        print(f"[{phase.name}] epoch {distiller.progress.epoch + 1}/{epochs} step {within}/{distiller.steps_per_epoch}"
              f" loss {metrics.get('loss/total', float('nan')):.4f}", flush=True)


def train_loop_per_worker(job: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``job`` is plain data (see ``train_job``), so it crosses to workers cheaply."""
    context = ray.train.get_context()
    torch.set_num_threads(job["torch_threads"])
    torch.manual_seed(job["settings"]["seed"])
    method = get_method(job["method"])(job["params"])
    settings = TrainSettings.model_validate(job["settings"])
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(job["tokenizer"])
    collator = Collator(tokenizer, job["max_length"], regression=job["regression"])

    online = method.needs_teacher_online
    teacher = None
    if job["teacher"] is not None:
        teacher = load_classifier(job["teacher"], job["num_labels"], attentions="attentions" in method.online_signals)
    if job["shape"] is None:
        student = load_classifier(job["init_model"], job["num_labels"])
    else:
        student = method.build_student(teacher, StudentShape.model_validate(job["shape"]))
    if "attentions" in method.student_outputs:
        student.set_attn_implementation("eager")
    if not online:
        teacher = None  # only needed to initialise the student; free its memory

    world = context.get_world_size()
    steps = math.ceil(job["train_rows"] / world / settings.batch_size)
    wrap = ray.train.torch.prepare_model if world > 1 else (lambda module: module.to(device))
    distiller = Distiller(method, student, teacher, settings, steps, device, wrap=wrap)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            distiller.load_state(directory)

    rank0 = context.get_world_rank() == 0
    rng = np.random.default_rng(settings.seed + context.get_world_rank())
    fault_step = int(os.environ.get("KD_FAULT_AT_STEP", "0"))
    while not distiller.finished:
        phase = distiller.phases[distiller.progress.phase_index].name
        chunks = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=settings.batch_size * settings.bucket_batches, batch_format="numpy",
            local_shuffle_buffer_size=settings.batch_size * settings.bucket_batches,
        )
        batches = (collator(rows) for rows in length_bucketed(chunks, settings.batch_size, rng))
        losses = distiller.run_epoch(batches, report=lambda metrics: _log_progress(distiller, metrics, rank0))
        if fault_step and checkpoint is None and distiller.progress.global_step >= fault_step and rank0:
            os._exit(1)  # fault injection for the fault-tolerance test: this worker dies after an epoch
        dev = _dev_metrics(distiller.student, collator, job["regression"], settings.batch_size * 2)
        record = {"phase": phase, "epoch": len([h for h in distiller.progress.history if "dev" in h]) + 1,
                  "step": distiller.progress.global_step, **losses, "dev": dev}
        distiller.progress.history.append(record)
        metrics = {"epoch": record["epoch"], "step": record["step"], **losses, **{f"dev_{k}": v for k, v in dev.items()}}
        with tempfile.TemporaryDirectory() as directory:
            if rank0:
                distiller.save_state(directory)
                if distiller.finished:
                    distiller.student.save_pretrained(Path(directory) / STUDENT_DIR)
                    tokenizer.save_pretrained(Path(directory) / STUDENT_DIR)
                    (Path(directory) / HISTORY_FILE).write_text(json.dumps(distiller.progress.history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank0 else None)


def train_job(*, method: str, params: dict, shape: dict | None, settings: TrainSettings, teacher: str | None,
              init_model: str | None, tokenizer: str, max_length: int, num_labels: int, regression: bool,
              train_rows: int, torch_threads: int) -> dict[str, Any]:
    return {
        "method": method, "params": params, "shape": shape, "settings": settings.model_dump(), "teacher": teacher,
        "init_model": init_model, "tokenizer": tokenizer, "max_length": max_length, "num_labels": num_labels,
        "regression": regression, "train_rows": train_rows, "torch_threads": torch_threads,
    }


def worker_threads(cfg) -> int:
    return cfg.ray.torch_threads or max(1, int(cfg.ray.cpus_per_worker))


def read_quietly(path: Path) -> ray.data.Dataset:
    """A Parquet dataset whose per-epoch iteration in the workers draws no progress bars: a Dataset keeps the
    DataContext it was created under, and per-epoch bars from every worker would drown the driver's display."""
    context = ray.data.DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        return ray.data.read_parquet(str(path))
    finally:
        context.enable_progress_bars = shown


def fit(cfg, job: dict[str, Any], train_path: Path, dev_path: Path, run_name: str, out: Path) -> dict:
    """Train on Ray and copy the finished student into ``out/student``; returns the epoch history."""
    storage = Path(cfg.ray.storage_path or cfg.workdir / "ray").expanduser().resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        datasets={"train": read_quietly(train_path), "dev": read_quietly(dev_path)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / STUDENT_DIR, out / STUDENT_DIR)
        history = json.loads((Path(directory) / HISTORY_FILE).read_text())
    return {"history": history, "final": result.metrics}


def run(cfg, spec, inputs, ctx, out: Path) -> dict:
    """Distil one student. ``spec`` is its entry in ``cfg.students``."""
    method = get_method(spec.method)
    data_dir = inputs["data"].path
    teacher_dir = str(inputs["teacher"].path / STUDENT_DIR)
    train_source = inputs["label"].path / "data" if "label" in inputs else data_dir / "train.parquet"
    train_rows = inputs["label"].result()["rows"] if "label" in inputs else inputs["data"].result()["rows"]["train"]
    job = train_job(
        method=spec.method, params=spec.params.model_dump(), shape=spec.student.model_dump(), settings=spec.train,
        teacher=teacher_dir, init_model=None, tokenizer=teacher_dir, max_length=cfg.teacher.max_length,
        num_labels=cfg.task.num_labels, regression=cfg.task.task_type == "regression", train_rows=train_rows,
        torch_threads=worker_threads(cfg),
    )
    outcome = fit(cfg, job, train_source, data_dir / "dev.parquet", f"{cfg.name}-{spec.name}-{ctx.key}", out)
    return {"method": method.name, "teacher_signals": "online" if method.needs_teacher_online else
            "cached" if method.uses_teacher else "none", **outcome}
