"""Soft targets from an ensemble of teachers, as MT-DNN's knowledge distillation (Liu et al., 2019) forms them.

For K teachers with logits z_k, the target at temperature T is the mean of their distributions

    p̄ = (1/K) Σ_k softmax(z_k / T).

``ensemble_logits`` turns p̄ back into logits any logit-based method can read: z̄ = T · log p̄. Since p̄ sums to 1,
softmax(z̄ / T) = softmax(log p̄) = p̄, so a method that forms softmax(z_t / T) from cached teacher logits (kd, pkd,
tinybert's prediction phase) trains on exactly the averaged distribution at that T. At any other temperature T'
it sees p̄^{T/T'} renormalised instead, so the T here must be the method's T.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _stack(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    if not logits_list:
        raise ValueError("an ensemble needs at least one teacher's logits")
    return torch.stack([torch.as_tensor(logits) for logits in logits_list])


def average_soft_targets(logits_list: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """p̄ = (1/K) Σ_k softmax(z_k / T): [..., C] probabilities from K teachers' logits of the same shape."""
    return torch.softmax(_stack(logits_list) / temperature, dim=-1).mean(0)


def ensemble_logits(logits_list: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """z̄ = T · log p̄, so that softmax(z̄ / T) = p̄. Probabilities are floored at the dtype's smallest normal
    number: a class every teacher rules out gets a large negative logit instead of −inf (which would make NaNs
    in a KL)."""
    probabilities = average_soft_targets(logits_list, temperature)
    return temperature * probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def ensemble_accuracy(logits_list: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy of the ensemble's prediction, argmax_c p̄_c at T = 1, against gold labels."""
    predictions = average_soft_targets(logits_list).argmax(-1)
    return (predictions == torch.as_tensor(labels, device=predictions.device)).float().mean().item()
