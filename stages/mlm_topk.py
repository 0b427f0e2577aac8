"""Ray Data: TextSmooth's teacher signal. Every row of a labelled corpus gets the masked-LM teacher's top-k
distribution at each of its tokens, read off the unmasked text: ``mlm_topk_ids`` (int32) and ``mlm_topk_probs``
(float16), each a list of k-vectors per token, written to Parquet next to the text and the soft labels.

A full vocabulary per token (30k floats) cannot be stored; k ids and probabilities can, and the student
renormalises over them (``kd/textsmooth.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import Field

from kd.batching import TEXT_A, TEXT_B, Collator
from kd.mlm import masked_lm_from, topk_per_position
from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS
from stages.config import LabelConfig, StageConfig, TeacherConfig
from stages.label import read_rows, teacher_pool, teacher_threads
from kd.layout import MLM_DIR
from kd.checkpoints import load_tokenizer

# Rows per forward: the masked LM's logits are [rows, tokens, vocabulary], 120 MB at 16 × 64 × 30k floats.
SLICE_ROWS = 16


def nested_lists(arrays: Sequence[np.ndarray]) -> pa.ListArray:
    """[L_i, k] arrays as one list<list<dtype>> column, from flat values and offsets rather than Python lists."""
    k = arrays[0].shape[1]
    positions = np.cumsum([0, *(len(array) for array in arrays)]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, positions[-1] * k + 1, k, dtype=np.int32)),
                                     pa.array(np.concatenate([array.reshape(-1) for array in arrays])))
    return pa.ListArray.from_arrays(pa.array(positions), inner)


class TopKPredictor:
    """One masked-LM teacher per actor; each call appends the two top-k columns to a batch of rows."""

    def __init__(self, model_dir: str, max_length: int, k: int, threads: int):
        torch.set_num_threads(threads)
        self.model = masked_lm_from(model_dir).eval()
        self.collator = Collator(load_tokenizer(model_dir), max_length)
        self.k = k

    def __call__(self, table: pa.Table) -> pa.Table:
        """Rows in length-sorted slices, so each slice pads only to its own longest text (as in labelling)."""
        texts = {column: np.array(table.column(column).to_pylist(), dtype=object)
                 for column in (TEXT_A, TEXT_B) if column in table.column_names}
        order = np.argsort([len(text) for text in texts[TEXT_A]], kind="stable")
        ids: list[np.ndarray | None] = [None] * table.num_rows
        probs: list[np.ndarray | None] = [None] * table.num_rows
        for start in range(0, len(order), SLICE_ROWS):
            index = order[start:start + SLICE_ROWS]
            encoded = self.collator.encode({column: values[index] for column, values in texts.items()})
            for row, (row_ids, row_probs) in zip(index, topk_per_position(self.model, encoded, self.k)):
                ids[row], probs[row] = row_ids, row_probs
        return table.append_column(MLM_TOPK_IDS, nested_lists(ids)).append_column(MLM_TOPK_PROBS, nested_lists(probs))


class Config(StageConfig):
    teacher: TeacherConfig
    label: LabelConfig
    k: int = Field(ge=1, description="Masked-LM ids kept per token (label.mlm_top_k).")

    def cpus_held(self) -> float:
        return self.label.pool_cpus


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    source = read_rows(inputs["label"].path / "data", inputs["label"].result()["rows"], cfg)
    with_topk = source.map_batches(
        TopKPredictor,
        fn_constructor_kwargs={"model_dir": str(inputs["mlm_teacher"].path / MLM_DIR),
                               "max_length": cfg.teacher.max_length, "k": cfg.k,
                               "threads": teacher_threads(cfg)},
        batch_format="pyarrow",
        **teacher_pool(cfg),
    )
    with_topk.write_parquet(str(out / "data"))
    rows = ray.data.read_parquet(str(out / "data")).count()
    return {"rows": rows, "k": cfg.k}
