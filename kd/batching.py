"""Turn rows of text (and cached teacher targets) into model-ready tensors."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS, pad_topk

TEXT_A, TEXT_B, LABEL, TEACHER_LOGITS = "text_a", "text_b", "label", "teacher_logits"
NO_LABEL = -1  # an augmented row: the teacher labels it, it has no gold label


def stack_column(values: Any) -> np.ndarray:
    """A column of per-row vectors as one 2-D array, whether it came as a 2-D array or an array of arrays."""
    array = np.asarray(values)
    if array.dtype == object:
        array = np.stack([np.asarray(v) for v in values])
    return array


def as_strings(values: Any) -> list[str]:
    return [str(v) for v in values]


class Collator:
    """Tokenise a batch with dynamic padding; carries gold labels and cached teacher logits through, and pads
    a cached masked-LM top-k (TextSmooth) to the batch's token length."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, regression: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.regression = regression

    def encode(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        texts = as_strings(rows[TEXT_A])
        pairs = as_strings(rows[TEXT_B]) if TEXT_B in rows else None
        return dict(
            self.tokenizer(
                texts, pairs, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
        )

    def __call__(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.add_targets(rows, self.encode(rows))

    def add_targets(self, rows: Mapping[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` (the encoded rows) with the rows' gold labels and cached teacher targets."""
        if LABEL in rows:
            labels = np.asarray(rows[LABEL])
            batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        if TEACHER_LOGITS in rows:
            batch[TEACHER_LOGITS] = torch.as_tensor(stack_column(rows[TEACHER_LOGITS]), dtype=torch.float32)
        if MLM_TOPK_IDS in rows:
            lengths = batch["attention_mask"].sum(1).tolist()
            batch[MLM_TOPK_IDS] = pad_topk(rows[MLM_TOPK_IDS], lengths, batch["input_ids"].shape[1])
            batch[MLM_TOPK_PROBS] = pad_topk(rows[MLM_TOPK_PROBS], lengths, batch["input_ids"].shape[1])
        return batch


def length_bucketed(chunks: Iterable[Mapping[str, np.ndarray]], batch_size: int, rng: np.random.Generator,
                    text_columns: tuple[str, ...] = (TEXT_A, TEXT_B)) -> Iterator[dict[str, np.ndarray]]:
    """Cut each (already shuffled) chunk of rows into batches of similar text length, visited in random order.

    Batches pad to their longest row; on rt-snippets the mean sentence is 27 tokens but a random batch of 32
    pads to about 50, so bucketing roughly halves the tokens computed. A chunk of many batches keeps the
    epoch shuffled. Every chunk of the same size gives the same number of batches, so data-parallel
    workers with equal shards stay in step.
    """
    for chunk in chunks:
        present = [column for column in text_columns if column in chunk]
        lengths = sum(np.array([len(str(text)) for text in chunk[column]]) for column in present)
        order = np.argsort(lengths, kind="stable")
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        for index in rng.permutation(len(batches)):
            yield {column: np.asarray(values)[batches[index]] for column, values in chunk.items()}


def iterate_frame(frame, batch_size: int):
    """Yield column dicts of ``batch_size`` rows from a pandas frame, in order."""
    for start in range(0, len(frame), batch_size):
        chunk = frame.iloc[start : start + batch_size]
        yield {column: chunk[column].to_numpy() for column in chunk.columns}
