"""Ray Data: the teacher's soft labels over the training split (or the augmented corpus), streamed through an
actor pool into Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from kd.batching import TEACHER_LOGITS, TEXT_A, Collator
from kd.ensemble import ensemble_logits
from stages.config import EnsembleConfig, LabelConfig, StageConfig, TaskConfig, TeacherConfig
from kd.checkpoints import load_classifier, load_tokenizer
from kd.layout import STUDENT_DIR

ROWS_PER_BLOCK = 2048
SLICE_ROWS = 32


class TeacherPredictor:
    """One teacher per actor, loaded once; each call adds the logits of a batch of rows."""

    def __init__(self, model_dir: str, num_labels: int, max_length: int, threads: int):
        torch.set_num_threads(threads)
        self.model = load_classifier(model_dir, num_labels).eval()
        self.collator = Collator(load_tokenizer(model_dir), max_length)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows[TEACHER_LOGITS] = self.logits(rows)
        return rows

    @torch.no_grad()
    def logits(self, rows: dict[str, np.ndarray]) -> np.ndarray:
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
        return logits


class EnsemblePredictor:
    """Every member of a teacher ensemble in one actor, each with its own tokenizer and max_length; each call adds
    the ensemble's logits z̄ = T · log p̄, p̄ the members' softmax(z_k / T) averaged (kd.ensemble), so that a
    method forming softmax(z / T) from them learns exactly p̄."""

    def __init__(self, model_dirs: list[str], max_lengths: list[int], num_labels: int, temperature: float,
                 threads: int):
        self.members = [TeacherPredictor(model_dir, num_labels, max_length, threads)
                        for model_dir, max_length in zip(model_dirs, max_lengths, strict=True)]
        self.temperature = temperature

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        member_logits = [torch.from_numpy(member.logits(rows)) for member in self.members]
        rows[TEACHER_LOGITS] = ensemble_logits(member_logits, self.temperature).numpy()
        return rows


def teacher_threads(cfg) -> int:
    return cfg.label.threads_per_actor or max(1, int(cfg.label.cpus_per_actor))


def teacher_pool(cfg) -> dict:
    """``map_batches`` options for a pool of actors that each hold a teacher model, sized by ``label.*``."""
    return dict(batch_size=cfg.label.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.label.actors),
                num_cpus=cfg.label.cpus_per_actor, num_gpus=cfg.label.gpus_per_actor or None,
                resources=cfg.label.resources or None)


def teacher_actors(dataset: ray.data.Dataset, predictor: type, cfg, **constructor_kwargs) -> ray.data.Dataset:
    """``dataset`` streamed through a pool of ``predictor`` actors, each built once with these arguments."""
    return dataset.map_batches(
        predictor,
        fn_constructor_kwargs={"num_labels": cfg.task.num_labels, "threads": teacher_threads(cfg), **constructor_kwargs},
        batch_format="numpy",
        **teacher_pool(cfg),
    )


def label_dataset(dataset: ray.data.Dataset, model_dir: str, cfg) -> ray.data.Dataset:
    """Append ``teacher_logits`` to every row, streaming blocks through a pool of teacher actors."""
    return teacher_actors(dataset, TeacherPredictor, cfg, model_dir=model_dir, max_length=cfg.teacher.max_length)


def ensemble_dataset(dataset: ray.data.Dataset, model_dirs: list[str], max_lengths: list[int], temperature: float,
                     cfg) -> ray.data.Dataset:
    """Append the ensemble's ``teacher_logits`` (see EnsemblePredictor) to every row; each actor of the pool holds
    every member."""
    return teacher_actors(dataset, EnsemblePredictor, cfg, model_dirs=model_dirs, max_lengths=max_lengths,
                          temperature=temperature)


MEMBER_PREFIX = "member_"


class Config(StageConfig):
    """``temperature`` and ``ensemble`` are set for the ensemble's soft labels, None for the teacher's."""

    task: TaskConfig
    teacher: TeacherConfig
    label: LabelConfig
    ensemble: EnsembleConfig | None = None
    temperature: float | None = None

    def cpus_held(self) -> float:
        return self.label.pool_cpus


def ensemble_temperature(spec) -> float | None:
    """The temperature at which the ensemble's probabilities are averaged for this student entry
    (``Method.ensemble_temperature``); None when it learns from the teacher's soft labels."""
    if spec.soft_labels != "ensemble":
        return None
    return spec.method_object().ensemble_temperature()


def member_inputs(inputs: dict) -> list:
    """The teacher artifacts of an ensemble, in member order (inputs ``member_0``, ``member_1``, …)."""
    return [inputs[f"{MEMBER_PREFIX}{index}"] for index in range(sum(name.startswith(MEMBER_PREFIX) for name in inputs))]


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


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    """The teacher's soft labels, or with ``member_*`` inputs the ensemble's, averaged at ``cfg.temperature``."""
    temperature = cfg.temperature
    source = read_rows(*corpus(inputs), cfg)
    members = member_inputs(inputs)
    if members:
        labelled = ensemble_dataset(source, [str(m.path / STUDENT_DIR) for m in members],
                                    [t.max_length for t in cfg.ensemble.teachers], temperature, cfg)
    else:
        labelled = label_dataset(source, str(inputs["teacher"].path / STUDENT_DIR), cfg)
    labelled.write_parquet(str(out / "data"))
    rows = ray.data.read_parquet(str(out / "data")).count()
    result = {"rows": rows}
    if members:
        result.update(teachers=len(members), temperature=temperature)
    return result
