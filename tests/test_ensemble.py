"""MT-DNN-style ensemble soft targets against numpy, and their logits round-trip through softmax(z/T)."""

import numpy as np
import pytest
import torch

from kd.ensemble import average_soft_targets, ensemble_accuracy, ensemble_logits
from kd.losses import kl_divergence

TEACHERS = [
    np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]]),
    np.array([[1.0, 1.0, 0.0], [-2.0, 0.0, 4.0]]),
    np.array([[0.0, 3.0, 0.5], [1.0, 1.0, 1.0]]),
]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def as_tensors(arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_average_soft_targets_match_numpy(temperature):
    expected = np.mean([softmax(z / temperature) for z in TEACHERS], axis=0)
    assert np.allclose(average_soft_targets(as_tensors(TEACHERS), temperature).numpy(), expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_ensemble_logits_reproduce_the_average_at_t(temperature):
    logits = ensemble_logits(as_tensors(TEACHERS), temperature)
    average = np.mean([softmax(z / temperature) for z in TEACHERS], axis=0)
    assert np.allclose(softmax(logits.numpy() / temperature), average)
    # So a logit-based method's KL to the ensemble is its KL to the averaged distribution.
    student = torch.tensor([[0.3, -0.2, 1.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    q = softmax(student.numpy() / temperature)
    by_hand = temperature**2 * np.mean(np.sum(average * np.log(average / q), axis=-1))
    assert kl_divergence(student, logits, temperature).item() == pytest.approx(by_hand)


def test_a_class_every_teacher_rules_out_stays_finite():
    logits = ensemble_logits([torch.tensor([[0.0, -1e4]]), torch.tensor([[1.0, -1e4]])])
    assert torch.isfinite(logits).all()


def test_one_teacher_is_its_own_distribution():
    (teacher,) = as_tensors(TEACHERS[:1])
    assert torch.allclose(torch.softmax(ensemble_logits([teacher], 2.0) / 2.0, -1), torch.softmax(teacher / 2.0, -1))


def test_ensemble_accuracy_uses_the_averaged_distribution():
    average = np.mean([softmax(z) for z in TEACHERS], axis=0)
    assert average.argmax(-1).tolist() == [1, 2]
    # Row 0: two of the three teachers vote class 0 by argmax, but the averaged distribution favours class 1.
    assert [int(z[0].argmax()) for z in TEACHERS] == [0, 0, 1]
    assert ensemble_accuracy(as_tensors(TEACHERS), torch.tensor([1, 2])) == 1.0
    assert ensemble_accuracy(as_tensors(TEACHERS), torch.tensor([0, 2])) == 0.5


def test_empty_ensemble_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        average_soft_targets([])
