"""Ray Data: the C-MLM teacher's soft targets for a generation task. Every train pair gets the teacher's top-k
distribution at each of its target tokens (``kd.cmlm.soft_targets``: the token masked with every ``rounds``-th
target token, the source and the rest of the target visible): ``cmlm_topk_ids`` (int32) and ``cmlm_topk_probs``
(float16, renormalised over the k at ``temperature``), each a list of k-vectors, one per target token in target
order, written to Parquet next to the pair. See docs/generation.md.

Alignment with the student: the pairs are cut exactly as ``kd.cmlm.student_batch`` cuts them (both go through
``kd.cmlm._word_pieces`` with ``max_target_length``; ``encode_pairs`` here, ``student_batch`` there), so a row's
i-th k-vector is the teacher's reading of the student's i-th label position. The student's labels are those
target word pieces followed by [SEP], which has no reading: a row has one k-vector fewer than it has labels
(``kd.textsmooth.pad_topk`` leaves the [SEP] position zero, and ``cmlm_loss`` then skips it). The lengths must
therefore be the ``cmlm_teacher``'s and the student's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from kd.checkpoints import load_tokenizer
from kd.cmlm import encode_pairs, soft_targets
from kd.layout import MLM_DIR
from kd.mlm import masked_lm_from
from stages.cmlm_teacher import SOURCE, TARGET, check_pair_length
from stages.config import CmlmLengths, CmlmTopKSettings, LabelConfig, StageConfig
from stages.label import read_rows, teacher_pool, teacher_threads
from stages.mlm_topk import nested_lists

CMLM_TOPK_IDS, CMLM_TOPK_PROBS = "cmlm_topk_ids", "cmlm_topk_probs"
# Pairs per ``soft_targets`` call: a pass holds hidden states [rows, source + target, H] and projects only that
# round's masked positions onto the vocabulary ([rows · target / rounds, V] floats, 35 MB at 32 · 64 / 7 · 30k).
SLICE_ROWS = 32


class CmlmTopKPredictor:
    """One C-MLM teacher per actor; each call appends the two top-k columns to a batch of pairs."""

    def __init__(self, model_dir: str, max_source_length: int, max_target_length: int, k: int, rounds: int,
                 temperature: float, threads: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        self.model = masked_lm_from(model_dir).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.lengths = (max_source_length, max_target_length)
        self.k, self.rounds, self.temperature = k, rounds, temperature

    def readings(self, sources: list[str], targets: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per pair, its top-k ids (int32) and probabilities (float16), [target tokens, k] each. Pairs go in
        length-sorted slices, so each slice pads only to its own longest pair; a pair's reading does not depend
        on its slice (the rounds group target tokens within a row)."""
        order = np.argsort([len(s) + len(t) for s, t in zip(sources, targets)], kind="stable")
        ids: list[np.ndarray | None] = [None] * len(sources)
        probs: list[np.ndarray | None] = [None] * len(sources)
        for start in range(0, len(order), SLICE_ROWS):
            index = order[start:start + SLICE_ROWS]
            batch = encode_pairs(self.tokenizer, [sources[i] for i in index], [targets[i] for i in index],
                                 *self.lengths)
            counts = batch["target_mask"].sum(1).tolist()
            batch = {key: value.to(self.device) for key, value in batch.items()}
            read = soft_targets(self.model, batch, self.rounds, self.k, self.temperature,
                                mask_token_id=self.tokenizer.mask_token_id)
            # Ordered by row, then target index: row r's entries are the r-th run of counts[r].
            bounds = np.cumsum(counts)[:-1]
            for row, row_ids, row_probs in zip(index, np.split(read["topk_ids"].numpy(), bounds),
                                               np.split(read["topk_probs"].numpy(), bounds)):
                ids[row], probs[row] = row_ids, row_probs
        return ids, probs

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return (table.append_column(CMLM_TOPK_IDS, pa.array([], pa.list_(pa.list_(pa.int32()))))
                    .append_column(CMLM_TOPK_PROBS, pa.array([], pa.list_(pa.list_(pa.float16())))))
        ids, probs = self.readings(table.column(SOURCE).to_pylist(), table.column(TARGET).to_pylist())
        return table.append_column(CMLM_TOPK_IDS, nested_lists(ids)).append_column(CMLM_TOPK_PROBS, nested_lists(probs))


class Config(StageConfig, CmlmLengths, CmlmTopKSettings):
    """The teacher is the ``cmlm_teacher`` input (whose key covers ``teacher``); the lengths must be the ones it
    was trained with and the student will be (the experiment's ``cmlm`` section gives all three)."""

    label: LabelConfig

    def cpus_held(self) -> float:
        return self.label.pool_cpus


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    """``inputs["data"]``: the task's Parquet (``train.parquet`` with ``source`` and ``target``);
    ``inputs["cmlm_teacher"]``: its ``model/``. Streams the train split through the actor pool into ``out/data``."""
    started = time.perf_counter()
    model_dir = str(inputs["cmlm_teacher"].path / MLM_DIR)
    check_pair_length(model_dir, cfg.max_source_length, cfg.max_target_length)
    train = inputs["data"].path / "train.parquet"
    source = read_rows(train, pq.ParquetFile(train).metadata.num_rows, cfg)
    with_topk = source.map_batches(
        CmlmTopKPredictor,
        fn_constructor_kwargs={"model_dir": model_dir, "max_source_length": cfg.max_source_length,
                               "max_target_length": cfg.max_target_length, "k": cfg.k, "rounds": cfg.rounds,
                               "temperature": cfg.temperature, "threads": teacher_threads(cfg),
                               "device": "cuda" if cfg.label.gpus_per_actor else "cpu"},
        batch_format="pyarrow",
        **teacher_pool(cfg),
    )
    with_topk.write_parquet(str(out / "data"))
    seconds = time.perf_counter() - started
    rows = ray.data.read_parquet(str(out / "data")).count()
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 2), "k": cfg.k,
            "rounds": cfg.rounds, "temperature": cfg.temperature}
