"""Conditional masked-LM distillation for text generation (Chen et al. 2020, "Distilling Knowledge Learned in
BERT for Text Generation").

A BERT teacher is fine-tuned as a conditional masked LM (C-MLM) on ``[CLS] source [SEP] target [SEP]``, with
only target tokens masked. Its distribution at target position t, given the source and the target with t
masked, sees context on both sides of t; it becomes the soft target of an autoregressive seq2seq student, which
only sees the target's left context:

    L = α · Σ_t KL(p_teacher(·|source, target∖t) ‖ p_student(·|source, target<t)) + (1 − α) · NLL(target)

The teacher's distribution is kept as its top-k ids and probabilities, renormalised over the k.

Alignment between the two halves: target token t of ``encode_pairs`` (the t-th True of a row's
``target_mask``, ``target_index`` t in ``soft_targets``) is label position t of ``student_batch``, whose labels
are the same word pieces followed by [SEP], the student's end of sequence. [SEP] has no teacher reading (it is
no target token), so its top-k probabilities stay zero and it is learnt from the NLL term alone.
``kd.textsmooth.pad_topk`` lays the per-row readings out as the [B, T, k] tensors ``cmlm_loss`` takes.

Pure PyTorch and transformers; the stages in ``stages/`` run these inside Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd.mlm import IGNORE_INDEX, MASK_PROBABILITY, logits_at

# BERT's replacement rule for a chosen token: [MASK] 80% of the time, a random token 10%, itself 10%.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1


def _word_pieces(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text's word-piece ids, without special tokens, cut to ``max_length`` pieces."""
    return tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def _right_padded(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    width = max((len(row) for row in rows), default=0)
    return torch.tensor([list(row) + [fill] * (width - len(row)) for row in rows], dtype=torch.long)


def encode_pairs(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], targets: Sequence[str],
                 max_source_length: int, max_target_length: int) -> dict[str, torch.Tensor]:
    """The teacher's input ``[CLS] source [SEP] target [SEP]``, right-padded, as tensors [B, L]: ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (0 for [CLS] source [SEP], 1 for target [SEP], BERT's sentence-pair
    convention) and ``target_mask``, True at the target's word pieces only (not at [CLS], the [SEP]s or padding).

    Source and target are cut separately, to ``max_source_length`` and ``max_target_length`` word pieces (special
    tokens not counted): cutting the pair as a whole would let a long source crowd out the target the teacher
    is asked about.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources for {len(targets)} targets")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, types, is_target = [], [], []
    for source, target in zip(_word_pieces(tokenizer, sources, max_source_length),
                              _word_pieces(tokenizer, targets, max_target_length)):
        ids.append([cls, *source, sep, *target, sep])
        types.append([0] * (len(source) + 2) + [1] * (len(target) + 1))
        is_target.append([0] * (len(source) + 2) + [1] * len(target) + [0])
    input_ids = _right_padded(ids, tokenizer.pad_token_id)
    attention_mask = _right_padded([[1] * len(row) for row in ids], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": _right_padded(types, 0), "target_mask": _right_padded(is_target, 0).bool()}


def student_batch(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], targets: Sequence[str],
                  max_source_length: int, max_target_length: int) -> dict[str, torch.Tensor]:
    """The seq2seq student's side of the same pairs: ``input_ids`` and ``attention_mask`` of ``[CLS] source [SEP]``
    (the teacher's segment A, so an encoder initialised from the teacher reads the input it was trained on) and
    ``labels`` = target word pieces + [SEP], padded with -100. Cut as ``encode_pairs`` cuts them, so label
    position t is target token t of the teacher's encoding. The model shifts the labels right itself (after
    ``decoder_start_token_id``, [CLS]; see ``kd.models.seq2seq``)."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources for {len(targets)} targets")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    encoder_ids = [[cls, *source, sep] for source in _word_pieces(tokenizer, sources, max_source_length)]
    labels = [[*target, sep] for target in _word_pieces(tokenizer, targets, max_target_length)]
    return {"input_ids": _right_padded(encoder_ids, tokenizer.pad_token_id),
            "attention_mask": _right_padded([[1] * len(row) for row in encoder_ids], 0),
            "labels": _right_padded(labels, IGNORE_INDEX)}


def mask_targets(input_ids: torch.Tensor, target_mask: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                 probability: float = MASK_PROBABILITY, generator: torch.Generator | None = None,
                 mask_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C-MLM masking: each target token is chosen with ``probability``, and at least one per row that has a
    target token (a short target would otherwise often teach nothing); source and special tokens never are.
    A chosen token becomes [MASK] 80% of the time, a random token 10%, and stays itself 10% (BERT's rule);
    with ``mask_only`` every chosen token becomes [MASK], for evaluation, where the score then reads "recover
    the word". Random replacements are drawn from the non-special tokens, so no [SEP] or [CLS] appears inside
    a target and blurs where the segments lie.

    Returns the masked ids and the labels (the original id at chosen positions, -100 elsewhere). The draws come
    from ``generator`` on the CPU, so a seeded generator masks the same way on any device.
    """
    target_mask = target_mask.bool()
    shape, device = input_ids.shape, input_ids.device
    chosen = (torch.rand(shape, generator=generator) < probability).to(device) & target_mask
    # A row left without a chosen token gets one target position, drawn uniformly from its target.
    scores = torch.rand(shape, generator=generator).to(device).masked_fill(~target_mask, -1.0)
    fallback = F.one_hot(scores.argmax(-1), shape[-1]).bool() & target_mask
    empty = ~chosen.any(-1, keepdim=True)
    chosen |= fallback & empty

    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    draw = torch.rand(shape, generator=generator).to(device)
    to_mask = chosen if mask_only else chosen & (draw < MASK_SHARE)
    to_random = chosen & ~to_mask & (draw < MASK_SHARE + RANDOM_SHARE)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=input_ids.dtype)
    random_ids = ordinary[torch.randint(len(ordinary), shape, generator=generator)].to(device)
    masked = input_ids.masked_fill(to_mask, tokenizer.mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def _target_index(target_mask: torch.Tensor) -> torch.Tensor:
    """Each position's index among its row's target tokens (0, 1, ...); -1 off the target."""
    target_mask = target_mask.bool()
    return (target_mask.long().cumsum(-1) - 1).masked_fill(~target_mask, -1)


def masking_rounds(target_mask: torch.Tensor, rounds: int) -> torch.Tensor:
    """A partition of every row's target tokens into ``rounds`` groups, as a bool tensor [rounds, B, L]: target
    token i (counted within its row) is in group i % rounds, so each group holds every ``rounds``-th token and
    each target token is in exactly one group. Deterministic: readings made from it are reproducible."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    index = _target_index(target_mask)
    groups = torch.arange(rounds, device=index.device).view(rounds, 1, 1)
    return (index >= 0) & (index % rounds == groups)


def _teacher_inputs(batch: dict[str, torch.Tensor], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": input_ids, "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"]}


@torch.no_grad()
def soft_targets(model: PreTrainedModel, batch: dict[str, torch.Tensor], rounds: int, k: int,
                 temperature: float = 1.0, *, mask_token_id: int) -> dict[str, torch.Tensor]:
    """The C-MLM teacher's top-k distribution at every target token of ``batch`` (from ``encode_pairs``).

    Reading target token t exactly means one forward pass with t alone masked: as many passes as there are
    target tokens. Instead, the tokens are split by ``masking_rounds`` into ``rounds`` groups, and one batched
    pass per group masks that group in all rows at once, so the whole batch costs ``rounds`` passes (each
    projecting only the masked positions onto the vocabulary). This is an approximation: in the pass that
    reads t, the other tokens of t's group are masked too, so the teacher predicts t from
    p(·|source, target ∖ group) rather than p(·|source, target ∖ t), with every ``rounds``-th target token
    hidden. Spacing the group ``rounds`` apart keeps t's nearest neighbours, the context that matters most,
    visible. More rounds hide less context and cost proportionally more passes; with ``rounds`` = the longest
    target, each group holds at most one token per row and the reading is the exact one-token-at-a-time one.
    (Chen et al.'s code uses 7 rounds.)

    The teacher's distribution softmax(z / ``temperature``) is cut to its top-k and renormalised over those k,
    which is the same as a softmax over the k largest logits alone at that temperature. ``cmlm_loss`` must
    then be given the same temperature for the student.

    Returns, one entry per target token, ordered by row and then target index: ``row`` and ``target_index``
    (int64 [N]), ``topk_ids`` (int32 [N, k]) and ``topk_probs`` (float16 [N, k], summing to 1 up to float16
    rounding): compact columns for Parquet, the per-row ones as TextSmooth's corpora store them.
    """
    model.eval()
    target_index = _target_index(batch["target_mask"])
    rows, indices, ids, probs = [], [], [], []
    for group in masking_rounds(batch["target_mask"], rounds):
        if not group.any():
            continue
        masked = batch["input_ids"].masked_fill(group, mask_token_id)
        logits = logits_at(model, _teacher_inputs(batch, masked), group).float()
        top_probs, top_ids = torch.softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        row, position = group.nonzero(as_tuple=True)
        rows.append(row)
        indices.append(target_index[row, position])
        ids.append(top_ids)
        probs.append(top_probs / top_probs.sum(-1, keepdim=True))
    if not rows:
        return {"row": torch.zeros(0, dtype=torch.long), "target_index": torch.zeros(0, dtype=torch.long),
                "topk_ids": torch.zeros(0, k, dtype=torch.int32), "topk_probs": torch.zeros(0, k, dtype=torch.float16)}
    row, index = torch.cat(rows), torch.cat(indices)
    order = torch.argsort(row * batch["input_ids"].shape[1] + index)
    return {"row": row[order].cpu(), "target_index": index[order].cpu(),
            "topk_ids": torch.cat(ids)[order].to(torch.int32).cpu(),
            "topk_probs": torch.cat(probs)[order].to(torch.float16).cpu()}


def cmlm_loss(student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor,
              alpha: float, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The student's loss: ``total`` = α · ``kd`` + (1 − α) · ``nll``.

    ``student_logits`` [B, T, V]; ``labels`` [B, T], -100 at padding; ``topk_ids`` and ``topk_probs`` [B, T, k],
    the teacher's reading aligned with the labels (zeros where it has none, e.g. at the final [SEP]).

    kd: per label position, the cross-entropy −Σ_k p̃_k · log softmax(z / T)[id_k] of the student against the
    teacher's top-k probabilities p̃ renormalised over the k, times T² (so its gradient keeps its scale as T
    changes, Hinton et al.), averaged over the non-padded positions that have a teacher reading. Positions
    whose k probabilities are all zero are left out of the sum and the count, so the term stays a per-token
    mean whatever share of positions carries a reading. The cross-entropy is the KL divergence of the paper
    plus the teacher's entropy, which does not depend on the student: the gradients are the same, and it
    needs no log p̃, which is undefined where a float16-stored probability has rounded to 0. Its minimum is
    therefore the teacher's entropy, not 0.

    nll: the token-level cross-entropy of the labels under softmax(z) (no temperature), averaged over the
    non-padded positions.
    """
    logits = student_logits.float()
    present = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum") / present.sum().clamp_min(1)

    probs = topk_probs.float()
    mass = probs.sum(-1)
    taught = present & (mass > 0)
    teacher = probs / mass.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    student_log_probs = F.log_softmax(logits / temperature, dim=-1).gather(-1, topk_ids.long())
    cross_entropy = -(teacher * student_log_probs).sum(-1)
    kd = temperature ** 2 * torch.where(taught, cross_entropy, 0.0).sum() / taught.sum().clamp_min(1)
    return {"kd": kd, "nll": nll, "total": alpha * kd + (1 - alpha) * nll}


@torch.no_grad()
def masked_target_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                           targets: Sequence[str], max_source_length: int, max_target_length: int,
                           batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """The C-MLM teacher's share of masked target tokens predicted exactly, on (dev) pairs: 15% of each target
    (at least one token) becomes [MASK], the source stays whole. The masking is drawn from ``seed`` alone, so
    two checkpoints scored with the same seed answer the same questions."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for start in range(0, len(sources), batch_size):
        batch = encode_pairs(tokenizer, sources[start:start + batch_size], targets[start:start + batch_size],
                             max_source_length, max_target_length)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        masked, labels = mask_targets(batch["input_ids"], batch["target_mask"], tokenizer,
                                      generator=generator, mask_only=True)
        chosen = labels != IGNORE_INDEX
        predictions = logits_at(model, _teacher_inputs(batch, masked), chosen).argmax(-1)
        correct += int((predictions == labels[chosen]).sum())
        total += int(chosen.sum())
    return {"accuracy": correct / max(total, 1), "masked_tokens": total}


# ---------------------------------------------------------------------------------------------------------------
# The student's batches: rows of pairs, with the top-k readings of ``stages/cmlm_topk.py`` when it has them.

# The task's seq2seq columns (stages.data, stages.cmlm_teacher) and the readings' columns (stages.cmlm_topk).
SOURCE, TARGET = "source", "target"
CMLM_TOPK_IDS, CMLM_TOPK_PROBS = "cmlm_topk_ids", "cmlm_topk_probs"
# The batch keys the readings travel under, [B, T, k], aligned with ``labels`` [B, T].
TOPK_IDS, TOPK_PROBS = "topk_ids", "topk_probs"


def _reading(cell, k: int, dtype) -> np.ndarray:
    """One row's stored readings as an array [n, k]: Parquet hands a list<list<…>> cell back as an array of
    k-vectors (or a 2-D array); an empty target's cell is empty."""
    vectors = [np.asarray(vector) for vector in cell]
    if not vectors:
        return np.zeros((0, k), dtype=dtype)
    return np.stack(vectors)


def aligned_readings(id_cells: Sequence, prob_cells: Sequence, label_counts: Sequence[int], width: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' stored top-k readings laid out against the student's labels: ``topk_ids`` (int32) and
    ``topk_probs`` (float16), each [B, width, k], zero past each row's readings, so the final [SEP] label and
    the padding have no teacher distribution (``cmlm_loss`` skips them).

    ``label_counts`` are the rows' label positions in this batch (target word pieces + [SEP]); a row must have
    exactly one reading fewer, or the readings were cut with another tokenizer or ``max_target_length`` and
    would land on the wrong tokens: that is refused. Readings stored with more than ``k`` ids keep their first
    ``k``, the most likely (``soft_targets`` stores them in descending order); ``cmlm_loss`` renormalises over
    the kept ids, which is then the teacher's distribution over its top-k at the same temperature. Fewer than
    ``k`` is refused.
    """
    ids = np.zeros((len(label_counts), width, k), dtype=np.int32)
    probs = np.zeros((len(label_counts), width, k), dtype=np.float16)
    for row, (id_cell, prob_cell, labels) in enumerate(zip(id_cells, prob_cells, label_counts, strict=True)):
        row_ids, row_probs = _reading(id_cell, k, np.int32), _reading(prob_cell, k, np.float16)
        if len(row_ids) != labels - 1 or len(row_probs) != labels - 1:
            raise ValueError(
                f"row {row}: the C-MLM top-k covers {len(row_ids)} target tokens, but the student's labels have "
                f"{labels - 1} (and [SEP]); the top-k stage cut the targets with another tokenizer or "
                "max_target_length")
        if len(row_ids) and (row_ids.shape[1] < k or row_probs.shape[1] < k):
            raise ValueError(f"row {row}: the C-MLM top-k stores {row_ids.shape[1]} ids per token; the student "
                             f"asks for k = {k}")
        ids[row, :len(row_ids)] = row_ids[:, :k]
        probs[row, :len(row_probs)] = row_probs[:, :k]
    return torch.from_numpy(ids), torch.from_numpy(probs)


class PairCollator:
    """Rows ``{source, target[, cmlm_topk_ids, cmlm_topk_probs]}`` as the seq2seq student's batch
    ``{input_ids, attention_mask, labels[, topk_ids, topk_probs]}`` (``student_batch``, ``aligned_readings``),
    with the interface ``kd.worker`` uses of ``kd.batching.Collator``: called on rows for training, ``encode``
    for evaluation (the pair without readings: dev rows have none), ``tokenizer`` saved with the student.

    ``k`` None: the readings are not read even when the rows carry them (the ``nll`` baseline).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int,
                 k: int | None = None):
        self.tokenizer = tokenizer
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.k = k

    def encode(self, rows) -> dict[str, torch.Tensor]:
        return student_batch(self.tokenizer, [str(text) for text in rows[SOURCE]],
                             [str(text) for text in rows[TARGET]], self.max_source_length, self.max_target_length)

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        batch = self.encode(rows)
        if self.k is not None and CMLM_TOPK_IDS in rows:
            labels = batch["labels"]
            batch[TOPK_IDS], batch[TOPK_PROBS] = aligned_readings(
                rows[CMLM_TOPK_IDS], rows[CMLM_TOPK_PROBS], (labels != IGNORE_INDEX).sum(1).tolist(),
                labels.shape[1], self.k)
        return batch


def decoder_inputs(model: PreTrainedModel, labels: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: the decoder reads the labels shifted right after ``decoder_start_token_id`` ([CLS]), -100
    read as [PAD], as BART's forward does given ``labels``; given these instead, it computes no loss of its own."""
    config = model.config
    shifted = labels.new_full(labels.shape, config.pad_token_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, config.pad_token_id)
    shifted[:, 0] = config.decoder_start_token_id
    return shifted


def token_nll(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The labels' mean token-level cross-entropy under softmax(z), over the non-padded positions: ``cmlm_loss``'s
    ``nll`` term alone."""
    return F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / (labels != IGNORE_INDEX).sum().clamp_min(1)


@torch.no_grad()
def teacher_forced_metrics(model: PreTrainedModel, collator: PairCollator, rows) -> dict[str, float]:
    """A seq2seq student's dev metrics under teacher forcing, over all label positions of ``rows`` (an iterable
    of row batches): ``token_accuracy``, the share whose argmax is the gold token, and ``nll``, the mean
    token-level cross-entropy. One forward pass per batch, no decoding: cheap enough for every epoch. NaN when
    the rows have no label position."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    nll = 0.0
    for chunk in rows:
        batch = collator.encode(chunk)
        labels = batch["labels"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       decoder_input_ids=decoder_inputs(model, labels)).logits.float()
        present = labels != IGNORE_INDEX
        nll += float(F.cross_entropy(logits[present], labels[present], reduction="sum"))
        correct += int((logits.argmax(-1)[present] == labels[present]).sum())
        total += int(present.sum())
    if not total:
        return {"token_accuracy": float("nan"), "nll": float("nan")}
    return {"token_accuracy": correct / total, "nll": nll / total}
