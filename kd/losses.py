"""Distillation losses, named in a registry so configs and layer maps can refer to them by string.

Feature losses (those a layer map names: mse, cos, normalized_mse, MobileBERT's attention_kl) all take
``(student, teacher, mask=None)``, so a method applies whichever a match names in the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kd.batching import NO_LABEL

LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def decorate(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = fn
        return fn

    return decorate


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


def is_regression_output(logits: torch.Tensor) -> bool:
    """One output column: a regression model's score, not class logits. A softmax over one column is 1 whatever the
    score, so KL or soft CE over it would be identically 0 and teach nothing; the soft losses compare scores instead."""
    return logits.shape[-1] == 1


@register_loss("kl")
def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch.

    The T² factor keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.).
    With a single output column (a regression task) it is the MSE between the student's and the teacher's scores,
    and the temperature, which only softens a distribution, plays no part.
    """
    if is_regression_output(student_logits):
        return F.mse_loss(student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@register_loss("soft_ce")
def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · CE(softmax(z_t/T), softmax(z_s/T)): KL plus the teacher's entropy, as DistilBERT and TinyBERT write it.

    With a single output column (a regression task) it is the MSE between the student's and the teacher's scores,
    as ``kl`` is, without the temperature.
    """
    if is_regression_output(student_logits):
        return F.mse_loss(student_logits, teacher_logits)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    return -(p_teacher * log_p_student).sum(-1).mean() * temperature**2


@register_loss("ce")
def hard_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE on gold labels, averaged over the rows that have one: augmented rows (``NO_LABEL``) are left out, and
    a batch of augmented rows only gives 0 rather than the NaN of an empty mean.

    Floating labels (a regression task) give the MSE between the single output column and the label, over every
    row: -1.0 is a score like any other, so no row can be marked unlabelled, and pipeline validation refuses
    augmented data for regression tasks.
    """
    if labels.is_floating_point():
        if not is_regression_output(student_logits):
            raise ValueError(f"floating (regression) labels need one output column; the logits have "
                             f"{student_logits.shape[-1]}")
        return F.mse_loss(student_logits.squeeze(-1), labels.to(student_logits.dtype))
    total = F.cross_entropy(student_logits, labels, ignore_index=NO_LABEL, reduction="sum")
    return total / (labels != NO_LABEL).sum().clamp_min(1)


@register_loss("mse")
def mean_squared_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over elements; with a token mask, padded positions are left out of the mean."""
    if mask is None:
        return F.mse_loss(student, teacher)
    weights = mask.to(student.dtype)
    while weights.dim() < student.dim():
        weights = weights.unsqueeze(-1)
    weights = weights.expand_as(student)
    return ((student - teacher) ** 2 * weights).sum() / weights.sum().clamp_min(1.0)


@register_loss("cos")
def cosine_embedding(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 − cos(h_s, h_t) over (unmasked) token vectors, DistilBERT's alignment loss."""
    distance = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    if mask is None:
        return distance.mean()
    weights = mask.to(distance.dtype)
    return (distance * weights).sum() / weights.sum().clamp_min(1.0)


@register_loss("normalized_mse")
def normalized_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BERT-PKD's patient loss: squared difference of the L2-normalised vectors, averaged over features and batch;
    with a mask over the vectors (a token mask), the masked ones are left out of the mean.

    The mean over features (not a sum) is the scale of the reference implementation (Sun et al.'s code applies
    ``F.mse_loss`` to the normalised vectors), for which its β = 100 was tuned; a sum would weigh the term d times
    more (384× for a MiniLM teacher).
    """
    return mean_squared_error(F.normalize(student, dim=-1), F.normalize(teacher, dim=-1), mask)


@register_loss("logit_mse")
def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Tang et al.: squared error between raw logits, summed over classes, averaged over the batch."""
    return ((student_logits - teacher_logits) ** 2).sum(-1).mean()
