"""TextSmooth (Wu et al.): the student reads a smoothed token distribution instead of one-hot ids.

    t̃ = λ · onehot(t) + (1 − λ) · p̃,      inputs_embeds = t̃ · E

p̃ is the teacher's masked-LM distribution at each position of the unmasked input, stored as its top-k ids and
probabilities and renormalised over those k ids. E is the student's word-embedding matrix [V, H].
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

MLM_TOPK_IDS, MLM_TOPK_PROBS = "mlm_topk_ids", "mlm_topk_probs"


def _renormalised(topk_probs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """p̃ = p / Σ_k p over the kept ids, and whether a position has any stored mass at all.

    Positions with no mass (padding, or tokens the labelling stage left without a distribution) get p̃ = 0;
    the callers give them their one-hot instead, so the mixture still sums to 1 and no NaN reaches the model.
    """
    probs = topk_probs.to(dtype)
    total = probs.sum(-1, keepdim=True)
    has_mass = total > 0
    return probs / total.clamp_min(torch.finfo(dtype).tiny), has_mass


def smoothed_distribution(
    input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor, vocab_size: int, lam: float
) -> torch.Tensor:
    """Dense t̃ [B, L, V] = λ · onehot(t) + (1 − λ) · p̃ (one-hot alone where p̃ is empty). For tests and checks."""
    p_tilde, has_mass = _renormalised(topk_probs, torch.float32)
    dense = torch.zeros(*input_ids.shape, vocab_size, dtype=torch.float32, device=input_ids.device)
    dense.scatter_add_(-1, topk_ids.long(), p_tilde)
    mix = (1 - lam) * has_mass.to(torch.float32)
    onehot = torch.nn.functional.one_hot(input_ids.long(), vocab_size).to(torch.float32)
    return (1 - mix) * onehot + mix * dense


def smoothed_inputs_embeds(
    input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor, embedding_matrix: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """t̃ · E [B, L, H], computed sparsely: λ · E[t] + (1 − λ) · Σ_k p̃_k · E[id_k].

    Only the k stored rows of E are gathered per position ([B, L, k, H]), never a [B, L, V] tensor, and the
    gradient reaches exactly those rows and E[t]. ``topk_ids`` is int [B, L, k], ``topk_probs`` float16 [B, L, k].
    """
    p_tilde, has_mass = _renormalised(topk_probs, embedding_matrix.dtype)
    mix = (1 - lam) * has_mass.to(embedding_matrix.dtype)
    neighbours = torch.einsum("blk,blkh->blh", p_tilde, embedding_matrix[topk_ids.long()])
    return (1 - mix) * embedding_matrix[input_ids] + mix * neighbours


def pad_topk(cells: Sequence[Any], lengths: Sequence[int], length: int) -> torch.Tensor:
    """Stored per-row top-k ([L_i, k] each, as Parquet hands it back: a 2-D array or an array of k-vectors)
    as one [B, length, k] tensor, right-padded with zeros in the stored dtype (int32 ids, float16 probabilities).

    Zero probabilities mark padding as having no distribution (see ``_renormalised``). ``lengths`` are the
    rows' token counts in this batch; a stored row of another length was computed with another tokenizer or
    max_length, and its distributions would land on the wrong tokens, so it is refused.
    """
    rows = [np.stack([np.asarray(position) for position in cell]) for cell in cells]
    for index, (row, tokens) in enumerate(zip(rows, lengths, strict=True)):
        if len(row) != tokens:
            raise ValueError(f"row {index}: the stored masked-LM top-k covers {len(row)} tokens but the row has "
                             f"{tokens}; the top-k stage used another tokenizer or max_length")
    out = np.zeros((len(rows), length, rows[0].shape[1]), dtype=rows[0].dtype)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return torch.from_numpy(out)
