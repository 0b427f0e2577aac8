"""General distillation on Ray Train: a student encoder distilled from the teacher's on an unlabelled corpus that
Ray Data streams to the workers (``kd.general`` is the loop). Data-parallel over ``ray.num_workers``; a killed run
resumes from its last checkpoint (the run's name follows the stage key), and the finished encoder is an artifact
any student can start from (``student.init_from: general:NAME``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train.torch import TorchTrainer

from kd.errors import StageError
from kd.general import general_job, train_general
from kd.layout import ENCODER_DIR, HISTORY_FILE, MLM_DIR, STUDENT_DIR
from stages.config import GeneralEntry, RunPlace, TeacherConfig
from stages.corpus import corpus_dataset
from stages.distill import PROGRESS_KEY, StreamedIO, ordered_ingest, scaling_config
from stages.models import resolve_model_source


class Config(RunPlace):
    general: GeneralEntry
    teacher: TeacherConfig


def train_loop_per_worker(job: dict[str, Any]) -> None:
    train_general(job, StreamedIO(job.get(PROGRESS_KEY)))


def teacher_folder(cfg: Config, inputs) -> str:
    """The encoder the student learns from: the checkpoint the teacher starts from, the fine-tuned teacher, or
    the masked-LM teacher."""
    if cfg.general.teacher == "pretrained":
        return resolve_model_source(cfg.teacher.source)
    if cfg.general.teacher == "finetuned":
        return str(inputs["teacher"].path / STUDENT_DIR)
    return str(inputs["mlm_teacher"].path / MLM_DIR)


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    entry = cfg.general
    dataset = corpus_dataset(entry.corpus, task_dir=inputs["data"].path if "data" in inputs else None,
                             augment_dir=inputs["augment"].path if "augment" in inputs else None)
    job = general_job(
        teacher=teacher_folder(cfg, inputs),
        mlm_head=str(inputs["mlm_teacher"].path / MLM_DIR) if "mlm_teacher" in inputs else None,
        shape=entry.student.model_dump(), losses=entry.losses.model_dump(), settings=entry.train.model_dump(),
        torch_threads=cfg.ray.threads_per_worker)
    job[PROGRESS_KEY] = ctx.key
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=scaling_config(cfg),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ordered_ingest()),
        run_config=ray.train.RunConfig(name=f"{cfg.name}-general-{entry.name}-{ctx.key}", storage_path=str(cfg.storage),
                                       checkpoint_config=CheckpointConfig(num_to_keep=1),
                                       failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise StageError(f"general distillation {entry.name!r} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / ENCODER_DIR, out / ENCODER_DIR)
        history = json.loads((Path(directory) / HISTORY_FILE).read_text())
    segments = [record for record in history if "sentences_per_second" in record]
    # The first segment carries the start-up of the stream and the models; the rate is read from the others.
    steady = segments[1:] or segments
    return {"steps": entry.train.steps, "workers": cfg.ray.num_workers, "history": history,
            "final": {key: value for key, value in segments[-1].items() if key.startswith("loss/")},
            "sentences_per_second": sum(r["sentences_per_second"] for r in steady) / len(steady),
            "tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "peak_rss_mb": segments[-1]["peak_rss_mb"]}
