"""Ray Data: the teacher's soft labels over the training split, streamed through an actor pool into Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from kd.batching import TEACHER_LOGITS, Collator
from stages.distill import STUDENT_DIR
from stages.models import load_classifier, load_tokenizer


class TeacherPredictor:
    """One teacher per actor, loaded once; each call adds the logits of a batch of rows."""

    def __init__(self, model_dir: str, num_labels: int, max_length: int, threads: int):
        torch.set_num_threads(threads)
        self.model = load_classifier(model_dir, num_labels).eval()
        self.collator = Collator(load_tokenizer(model_dir), max_length)

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = self.collator.encode(rows)
        rows[TEACHER_LOGITS] = self.model(**encoded).logits.float().numpy()
        return rows


def label_dataset(dataset: ray.data.Dataset, model_dir: str, cfg) -> ray.data.Dataset:
    return dataset.map_batches(
        TeacherPredictor,
        fn_constructor_kwargs={
            "model_dir": model_dir, "num_labels": cfg.task.num_labels, "max_length": cfg.teacher.max_length,
            "threads": max(1, int(cfg.label.cpus_per_actor)),
        },
        batch_size=cfg.label.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.label.actors),
        num_cpus=cfg.label.cpus_per_actor,
    )


def run(cfg, inputs, ctx, out: Path) -> dict:
    source = ray.data.read_parquet(str(inputs["data"].path / "train.parquet"))
    labelled = label_dataset(source, str(inputs["teacher"].path / STUDENT_DIR), cfg)
    labelled.write_parquet(str(out / "data"))
    rows = ray.data.read_parquet(str(out / "data")).count()
    return {"rows": rows}
