"""The C-MLM teacher of a generation (seq2seq) task: the teacher checkpoint under a masked-LM head, fine-tuned as a
conditional masked LM on the task's pairs, ``[CLS] source [SEP] target [SEP]`` with only target tokens masked
(``kd.cmlm``), as one Ray task (as ``stages.mlm_teacher`` adapts the masked-LM teacher). Its readings of every
target token are the soft targets of the seq2seq student (stage ``cmlm_topk``). See docs/generation.md.

Writes ``model/``: a ``BertForMaskedLM`` folder with its tokenizer. Returns masked-target-token accuracy on dev
before and after, and the loss curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import ray
import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import AutoConfig, get_linear_schedule_with_warmup

from kd.checkpoints import load_tokenizer
from kd.cmlm import encode_pairs, mask_targets, masked_target_accuracy
from kd.errors import StageError
from kd.layout import MLM_DIR
from kd.mlm import IGNORE_INDEX, logits_at, masked_lm_from
from stages.config import CmlmSettings, RayConfig, StageConfig, TeacherConfig
from stages.models import resolve_model_source

# The task's seq2seq columns, as the data stage writes them (stages.data.SOURCE, TARGET).
SOURCE, TARGET = "source", "target"
# Steps between two loss records (and progress lines).
REPORT_EVERY = 50
# [CLS] source [SEP] target [SEP]: the special tokens around the two cut segments.
PAIR_SPECIAL_TOKENS = 3


def check_pair_length(model_source: str, max_source_length: int, max_target_length: int) -> None:
    """Refuse lengths whose longest pair the model has no positions for (a clear message instead of an index
    error in the middle of a Ray task). Reads only the checkpoint's config."""
    try:
        positions = AutoConfig.from_pretrained(model_source).max_position_embeddings
    except (OSError, ValueError) as error:
        raise StageError(f"{model_source!r}: cannot read its config: {error}") from None
    longest = max_source_length + max_target_length + PAIR_SPECIAL_TOKENS
    if longest > positions:
        raise StageError(f"max_source_length {max_source_length} + max_target_length {max_target_length} + "
                         f"{PAIR_SPECIAL_TOKENS} special tokens = {longest} positions, but {model_source!r} has "
                         f"{positions}: shorten them")


def read_pairs(data_dir: Path, split: str) -> tuple[list[str], list[str]]:
    frame = pd.read_parquet(data_dir / f"{split}.parquet", columns=[SOURCE, TARGET])
    return frame[SOURCE].astype(str).tolist(), frame[TARGET].astype(str).tolist()


def shuffled_indices(count: int, generator: torch.Generator) -> Iterator[int]:
    """0 … count − 1 in a fresh seeded order on every pass, for as many passes as are read."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def cmlm_step_loss(model, batch: dict[str, torch.Tensor], tokenizer, probability: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Mean cross-entropy over the masked target tokens of a batch from ``encode_pairs``, target-only masking
    drawn from ``generator``; the vocabulary projection is computed at the masked positions only."""
    masked, labels = mask_targets(batch["input_ids"], batch["target_mask"], tokenizer, probability=probability,
                                  generator=generator)
    chosen = labels != IGNORE_INDEX
    inputs = {"input_ids": masked, "attention_mask": batch["attention_mask"], "token_type_ids": batch["token_type_ids"]}
    # Summed, then divided: a batch whose targets are all empty has no masked token, and an empty mean is NaN.
    return F.cross_entropy(logits_at(model, inputs, chosen), labels[chosen], reduction="sum") / chosen.sum().clamp_min(1)


def train_cmlm_teacher(model_source: str, data_dir: str, out_dir: str, settings: dict, seed: int, threads: int,
                       report_every: int = REPORT_EVERY, device: str = "cpu") -> dict:
    """Masked-target-token accuracy on dev, ``steps`` steps of C-MLM fine-tuning on the train pairs, the accuracy
    again; saves the masked LM and its tokenizer to ``out_dir``. The body of the stage's Ray task, callable
    without Ray.

    The pairs are reshuffled on every pass (seeded), each batch is masked afresh (its own seeded generator, so the
    order does not depend on the masking and both are reproducible); AdamW with weight decay 0.01, linear warm-up
    over ``warmup_ratio`` of the steps then linear decay to 0, gradients clipped to norm 1. fp32.
    """
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # a checkpoint without an MLM head gets a new one: seeded
    cmlm = CmlmSettings.model_validate(settings)
    lengths = (cmlm.max_source_length, cmlm.max_target_length)
    tokenizer = load_tokenizer(model_source)
    model = masked_lm_from(model_source).to(device)
    train, dev = read_pairs(Path(data_dir), "train"), read_pairs(Path(data_dir), "dev")
    if not train[0]:
        raise ValueError(f"{data_dir}/train.parquet has no pairs")
    before = masked_target_accuracy(model, tokenizer, *dev, *lengths, seed=seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cmlm.learning_rate, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cmlm.warmup_ratio * cmlm.steps), cmlm.steps)
    order = shuffled_indices(len(train[0]), torch.Generator().manual_seed(seed))
    masking = torch.Generator().manual_seed(seed + 1)
    history, running = [], []
    model.train()
    for step in range(1, cmlm.steps + 1):
        rows = [next(order) for _ in range(cmlm.batch_size)]
        batch = encode_pairs(tokenizer, [train[0][i] for i in rows], [train[1][i] for i in rows], *lengths)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = cmlm_step_loss(model, batch, tokenizer, cmlm.mask_probability, masking)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(float(loss.detach()))
        if step % report_every == 0 or step == cmlm.steps:
            record = {"step": step, "loss/cmlm": sum(running) / len(running)}
            history.append(record)
            running = []
            print(f"[cmlm_teacher] step {step}/{cmlm.steps} loss {record['loss/cmlm']:.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} ({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()

    after = masked_target_accuracy(model, tokenizer, *dev, *lengths, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"masked_accuracy": {"before": before["accuracy"], "after": after["accuracy"]},
            "masked_tokens": after["masked_tokens"], "train_pairs": len(train[0]), "dev_pairs": len(dev[0]),
            "steps": cmlm.steps, "history": history, "seconds": round(time.perf_counter() - started, 2)}


class Config(StageConfig):
    """Reads ``teacher.source`` (the checkpoint fine-tuned here: the pre-trained model, not the classification
    teacher); the pair lengths are ``cmlm``'s, not ``teacher.max_length``."""

    teacher: TeacherConfig
    seed: int
    ray: RayConfig
    cmlm: CmlmSettings = Field(default_factory=CmlmSettings)

    def cpus_held(self) -> float:
        return self.ray.cpus_per_worker  # the training task's


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    """``inputs["data"]``: the task's ``train/dev/test.parquet`` with ``source`` and ``target``."""
    source = resolve_model_source(cfg.teacher.source)
    check_pair_length(source, cfg.cmlm.max_source_length, cfg.cmlm.max_target_length)
    use_gpu = cfg.ray.use_gpu
    task = ray.remote(num_cpus=cfg.cpus_held(), num_gpus=1 if use_gpu else 0)(train_cmlm_teacher)
    return ray.get(task.remote(source, str(inputs["data"].path), str(out / MLM_DIR), cfg.cmlm.model_dump(), cfg.seed,
                               cfg.ray.threads_per_worker, device="cuda" if use_gpu else "cpu"))
