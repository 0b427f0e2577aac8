"""The teacher: loaded from the hub, a local folder or an installed package, and fine-tuned on the task
(through Ray Train, with the ``finetune`` method) when it has no classifier for it."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from transformers import AutoModelForSequenceClassification

from kd.batching import TEXT_A, TEXT_B
from kd.checkpoints import load_with_new_head
from kd.methods.finetune import FineTune
from stages.distill import fit
from kd.layout import PRETRAINED_DIR, STUDENT_DIR
from kd.worker import train_job
from stages.config import RunPlace, TaskConfig, TeacherConfig
from kd.errors import StageError
from kd.checkpoints import load_tokenizer
from stages.models import resolve_model_source

log = logging.getLogger(__name__)


class Config(RunPlace):
    teacher: TeacherConfig
    task: TaskConfig


def load_candidate(source: str, num_labels: int):
    """The checkpoint as a classifier, and whether it already has a trained head for ``num_labels`` classes."""
    try:
        model, new_weights = load_with_new_head(AutoModelForSequenceClassification, source, num_labels=num_labels)
    except (OSError, ValueError) as error:
        raise StageError(f"cannot load teacher {source!r}: {error}") from None
    return model, not new_weights


def count_truncated(tokenizer, data_dir: Path, max_length: int) -> dict[str, int]:
    """Rows per split whose text (or text pair) is longer than ``max_length`` tokens and will be truncated."""
    counts = {}
    for split in ("train", "dev", "test"):
        frame = pd.read_parquet(data_dir / f"{split}.parquet")
        pairs = frame[TEXT_B].tolist() if TEXT_B in frame.columns else None
        lengths = [len(ids) for ids in tokenizer(frame[TEXT_A].tolist(), pairs)["input_ids"]]
        counts[split] = sum(length > max_length for length in lengths)
    return counts


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    source = resolve_model_source(cfg.teacher.source)
    num_labels = cfg.task.num_labels
    truncated = count_truncated(load_tokenizer(source), inputs["data"].path, cfg.teacher.max_length)
    if any(truncated.values()):
        log.warning("texts longer than teacher.max_length=%d tokens are truncated: %s",
                    cfg.teacher.max_length, ", ".join(f"{n} in {split}" for split, n in truncated.items()))
    model, headed = load_candidate(source, num_labels)
    if cfg.teacher.finetune == "never" and not headed:
        raise StageError(f"teacher {cfg.teacher.source!r} has no {num_labels}-way classifier and teacher.finetune is 'never'")
    must_train = cfg.teacher.finetune == "always" or not headed
    # Workers (maybe on other nodes) load from a folder under the shared workdir, so a hub model is fetched once.
    # The pre-trained checkpoint stays in the artifact: students with init_from: pretrained start from it.
    initial = out / (STUDENT_DIR if not must_train else PRETRAINED_DIR)
    model.save_pretrained(initial)
    load_tokenizer(source).save_pretrained(initial)
    if not must_train:
        return {"source": cfg.teacher.source, "fine_tuned": False, "truncated": truncated}

    log.info("teacher %s has no classifier for this task: fine-tuning it on Ray Train", cfg.teacher.source)
    data_dir = inputs["data"].path
    job = train_job(
        method=FineTune.name, params={}, shape=None, settings=cfg.teacher.train, teacher=None, init_model=str(initial),
        tokenizer=str(initial), max_length=cfg.teacher.max_length, num_labels=num_labels,
        regression=cfg.task.task_type == "regression", train_rows=inputs["data"].result()["rows"]["train"],
        train_path=str(data_dir / "train.parquet"), torch_threads=cfg.ray.threads_per_worker,
    )
    outcome = fit(cfg, job, data_dir / "train.parquet", data_dir / "dev.parquet", f"{cfg.name}-teacher-{ctx.key}", out,
                  progress_key=ctx.key)
    return {"source": cfg.teacher.source, "fine_tuned": True, "truncated": truncated, **outcome}
