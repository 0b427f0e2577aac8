"""The masked-LM teacher: the classification teacher's encoder under an MLM head, adapted to the task's own
train text, as a second artifact next to the classification teacher (see the README, *Transfer corpora*)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray
import torch

from kd.batching import TEXT_A, TEXT_B
from kd.mlm import MlmSettings, adapt, masked_lm_from, masked_token_accuracy
from stages.config import RayConfig, StageConfig, TeacherConfig
from kd.checkpoints import load_tokenizer
from kd.layout import MLM_DIR, STUDENT_DIR

def split_text(data_dir: Path, split: str) -> tuple[list[str], list[str] | None]:
    frame = pd.read_parquet(data_dir / f"{split}.parquet")
    return frame[TEXT_A].tolist(), frame[TEXT_B].tolist() if TEXT_B in frame.columns else None


def adapt_teacher(teacher_dir: str, data_dir: str, out_dir: str, settings: dict, max_length: int, seed: int,
                  threads: int) -> dict:
    """Held-out (dev) masked-token accuracy, adaptation on the train text, the same accuracy again; saves the
    masked LM and its tokenizer to ``out_dir``."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    mlm = MlmSettings.model_validate(settings)
    tokenizer = load_tokenizer(teacher_dir)
    model = masked_lm_from(teacher_dir)
    train, dev = split_text(Path(data_dir), "train"), split_text(Path(data_dir), "dev")
    before = masked_token_accuracy(model, tokenizer, *dev, max_length=max_length, seed=seed)
    history = adapt(model, tokenizer, *train, mlm, max_length, seed=seed)
    after = masked_token_accuracy(model, tokenizer, *dev, max_length=max_length, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"masked_accuracy": {"before": before["accuracy"], "after": after["accuracy"]},
            "masked_tokens": after["masked_tokens"], "train": mlm.train, "steps": mlm.steps, "history": history}


class Config(StageConfig):
    teacher: TeacherConfig
    seed: int
    ray: RayConfig

    def cpus_held(self) -> float:
        return self.ray.cpus_per_worker  # the training task's


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    threads = cfg.ray.threads_per_worker
    task = ray.remote(num_cpus=cfg.cpus_held())(adapt_teacher)
    return ray.get(task.remote(
        str(inputs["teacher"].path / STUDENT_DIR), str(inputs["data"].path), str(out / MLM_DIR),
        cfg.teacher.mlm.model_dump(), cfg.teacher.max_length, cfg.seed, threads))
