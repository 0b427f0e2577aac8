"""Ray Data: the teacher's soft labels over the training split (or the augmented corpus), streamed through an
actor pool into Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from kd.batching import TEACHER_LOGITS, TEXT_A, Collator
from stages.models import load_classifier, load_tokenizer
from stages.student_training import STUDENT_DIR

ROWS_PER_BLOCK = 2048
SLICE_ROWS = 32


class TeacherPredictor:
    """One teacher per actor, loaded once; each call adds the logits of a batch of rows."""

    def __init__(self, model_dir: str, num_labels: int, max_length: int, threads: int):
        torch.set_num_threads(threads)
        self.model = load_classifier(model_dir, num_labels).eval()
        self.collator = Collator(load_tokenizer(model_dir), max_length)

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the batch in length-sorted slices: each slice pads only to its own longest text, which on
        sentence corpora roughly halves the tokens computed against padding the whole batch."""
        lengths = np.array([len(str(text)) for text in rows[TEXT_A]])
        order = np.argsort(lengths, kind="stable")
        logits = None
        for start in range(0, len(order), SLICE_ROWS):
            index = order[start:start + SLICE_ROWS]
            encoded = self.collator.encode({column: np.asarray(values)[index] for column, values in rows.items()})
            output = self.model(**encoded).logits.float().numpy()
            if logits is None:
                logits = np.empty((len(order), output.shape[-1]), dtype=np.float32)
            logits[index] = output
        rows[TEACHER_LOGITS] = logits
        return rows


def teacher_threads(cfg) -> int:
    return cfg.label.threads_per_actor or max(1, int(cfg.label.cpus_per_actor))


def teacher_pool(cfg) -> dict:
    """``map_batches`` options for a pool of actors that each hold a teacher model, sized by ``label.*``."""
    return dict(batch_size=cfg.label.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.label.actors),
                num_cpus=cfg.label.cpus_per_actor, num_gpus=cfg.label.gpus_per_actor or None,
                resources=cfg.label.resources or None)


def label_dataset(dataset: ray.data.Dataset, model_dir: str, cfg) -> ray.data.Dataset:
    """Append ``teacher_logits`` to every row, streaming blocks through a pool of teacher actors."""
    return dataset.map_batches(
        TeacherPredictor,
        fn_constructor_kwargs={
            "model_dir": model_dir, "num_labels": cfg.task.num_labels, "max_length": cfg.teacher.max_length,
            "threads": teacher_threads(cfg),
        },
        batch_format="numpy",
        **teacher_pool(cfg),
    )


def read_rows(path: Path, rows: int, cfg) -> ray.data.Dataset:
    """Parquet in blocks of at most a few thousand rows, at least four per actor. Ray 2.60 reads one file as one
    block whatever ``override_num_blocks`` says, which gave one actor all the work (a pool of two on two nodes
    left one idle) and made the block as large as the split; the streaming repartition splits it as it flows."""
    rows_per_block = max(1, min(ROWS_PER_BLOCK, -(-rows // (cfg.label.actors * 4))))
    return ray.data.read_parquet(str(path)).repartition(target_num_rows_per_block=rows_per_block)


def corpus(inputs) -> tuple[Path, int]:
    """What to label, and its rows: the augmented corpus when the stage is given one, else the train split."""
    if "augment" in inputs:
        return inputs["augment"].path / "data", inputs["augment"].result()["rows"]
    return inputs["data"].path / "train.parquet", inputs["data"].result()["rows"]["train"]


def run(cfg, inputs, ctx, out: Path) -> dict:
    source = read_rows(*corpus(inputs), cfg)
    labelled = label_dataset(source, str(inputs["teacher"].path / STUDENT_DIR), cfg)
    labelled.write_parquet(str(out / "data"))
    rows = ray.data.read_parquet(str(out / "data")).count()
    return {"rows": rows}
