"""Each loss against its formula, computed independently on small hand-written tensors."""

import math

import numpy as np
import pytest
import torch

from kd.losses import LOSSES, get_loss, register_loss
from kd.methods import get_method
from kd.methods.base import TeacherOutputs


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


STUDENT = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
TEACHER = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]])


def test_kl_matches_hand_computed_value_with_t_squared():
    T = 2.0
    p, q = softmax(TEACHER / T), softmax(STUDENT / T)
    expected = T**2 * np.mean(np.sum(p * np.log(p / q), axis=-1))
    got = get_loss("kl")(torch.tensor(STUDENT), torch.tensor(TEACHER), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_identical_logits():
    logits = torch.tensor(STUDENT)
    assert get_loss("kl")(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_ce_is_kl_plus_teacher_entropy():
    T = 1.5
    p, q = softmax(TEACHER / T), softmax(STUDENT / T)
    expected = T**2 * np.mean(-np.sum(p * np.log(q), axis=-1))
    got = get_loss("soft_ce")(torch.tensor(STUDENT), torch.tensor(TEACHER), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mse_with_mask_ignores_padding():
    student = torch.tensor([[[1.0, 1.0], [5.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert get_loss("mse")(student, teacher, mask).item() == pytest.approx(0.5)
    assert get_loss("mse")(student, teacher).item() == pytest.approx((1 + 25 + 25) / 4)


def test_cosine_loss_is_one_minus_cosine():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert get_loss("cos")(a, b).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_normalized_mse_compares_directions_only():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    assert get_loss("normalized_mse")(a, b).item() == pytest.approx(2.0)
    assert get_loss("normalized_mse")(a, 10 * a).item() == pytest.approx(0.0, abs=1e-7)


def test_logit_mse_sums_classes_and_averages_batch():
    expected = np.mean(np.sum((STUDENT - TEACHER) ** 2, axis=-1))
    assert get_loss("logit_mse")(torch.tensor(STUDENT), torch.tensor(TEACHER)).item() == pytest.approx(expected)


def test_hinton_kd_total_is_alpha_weighted_sum():
    T, alpha = 4.0, 0.7
    labels = np.array([1, 2])
    p, q = softmax(TEACHER / T), softmax(STUDENT / T)
    kd = T**2 * np.mean(np.sum(p * np.log(p / q), axis=-1))
    ce = -np.mean(np.log(softmax(STUDENT)[np.arange(2), labels]))
    method = get_method("kd")({"temperature": T, "alpha": alpha})
    student_out = type("Out", (), {"logits": torch.tensor(STUDENT)})()
    losses = method.loss(student_out, TeacherOutputs(logits=torch.tensor(TEACHER)), {"labels": torch.tensor(labels)}, None, "train")
    assert losses["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["total"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-6)


def test_finetune_is_plain_cross_entropy():
    labels = np.array([0, 2])
    ce = -np.mean(np.log(softmax(STUDENT)[np.arange(2), labels]))
    student_out = type("Out", (), {"logits": torch.tensor(STUDENT)})()
    losses = get_method("finetune")().loss(student_out, None, {"labels": torch.tensor(labels)}, None, "train")
    assert losses["total"].item() == pytest.approx(ce, rel=1e-6)


def test_registry_refuses_duplicates_and_names_unknown_losses():
    with pytest.raises(ValueError, match="twice"):
        register_loss("kl")(lambda: None)
    with pytest.raises(KeyError, match="known"):
        get_loss("nope")
    assert {"kl", "soft_ce", "ce", "mse", "cos"} <= set(LOSSES)
