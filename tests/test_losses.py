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
    # (1, 0) − (0, 1) = (1, −1): squared (1, 1), whose mean is 1 (a sum over features would give 2).
    assert get_loss("normalized_mse")(a, b).item() == pytest.approx(1.0)
    assert get_loss("normalized_mse")(a, 10 * a).item() == pytest.approx(0.0, abs=1e-7)


def test_normalized_mse_is_a_mean_over_features_and_batch_as_in_the_reference_code():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # Row 1: (0.6, 0.8) − (0.8, 0.6) = (−0.2, 0.2), squared (0.04, 0.04); row 2: (1, 0) − (0, 1), squared (1, 1).
    # Four squared differences averaged: (0.04 + 0.04 + 1 + 1) / 4.
    assert get_loss("normalized_mse")(student, teacher).item() == pytest.approx(0.52, rel=1e-6)


def test_normalized_mse_leaves_masked_rows_out_of_the_mean():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # Only row 1 counts: (0.04 + 0.04) / 2, still a mean over its features.
    assert get_loss("normalized_mse")(student, teacher, torch.tensor([1, 0])).item() == pytest.approx(0.04, rel=1e-5)
    assert get_loss("normalized_mse")(student, teacher, torch.ones(2)).item() == pytest.approx(0.52, rel=1e-6)


@pytest.mark.parametrize("name", ["mse", "cos", "normalized_mse"])
def test_feature_losses_take_a_token_mask(name):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = mask.bool()
    masked = get_loss(name)(student, teacher, mask)
    assert masked.item() == pytest.approx(get_loss(name)(student[kept], teacher[kept]).item(), rel=1e-5)


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


# ---- regression: one output column, float labels ---------------------------------------------------------------

SCORES = np.array([[0.5], [-1.0], [2.0]])  # a regression student's outputs [B, 1]
TEACHER_SCORES = np.array([[1.0], [-1.5], [0.0]])
FLOAT_LABELS = np.array([0.0, -1.0, 2.5])  # -1.0 is a score, not NO_LABEL


@pytest.mark.parametrize("name", ["kl", "soft_ce"])
def test_soft_losses_on_one_column_are_the_mse_to_the_teachers_score(name):
    # ((0.5 − 1)² + (−1 + 1.5)² + (2 − 0)²) / 3 = (0.25 + 0.25 + 4) / 3; the temperature plays no part.
    for temperature in (1.0, 4.0):
        got = get_loss(name)(torch.tensor(SCORES), torch.tensor(TEACHER_SCORES), temperature)
        assert got.item() == pytest.approx(4.5 / 3, rel=1e-9)


def test_ce_on_float_labels_is_the_mse_over_every_row():
    # ((0.5 − 0)² + (−1 + 1)² + (2 − 2.5)²) / 3: the row labelled −1.0 counts (and here fits exactly).
    got = get_loss("ce")(torch.tensor(SCORES), torch.tensor(FLOAT_LABELS))
    assert got.item() == pytest.approx(0.5 / 3, rel=1e-9)


def test_ce_on_float32_labels_keeps_the_students_dtype():
    got = get_loss("ce")(torch.tensor(SCORES, dtype=torch.float32), torch.tensor(FLOAT_LABELS, dtype=torch.float32))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.5 / 3, rel=1e-6)


def test_ce_refuses_float_labels_for_class_logits():
    with pytest.raises(ValueError, match="one output column; the logits have 3"):
        get_loss("ce")(torch.tensor(STUDENT), torch.tensor([0.5, 1.0]))


def test_class_logits_keep_the_distribution_losses():
    # Two columns are classes, not a score: KL between the softmaxes, as before.
    two = np.array([[1.0, 0.0]])
    p, q = softmax(np.array([[0.0, 1.0]])), softmax(two)
    got = get_loss("kl")(torch.tensor(two), torch.tensor([[0.0, 1.0]]))
    assert got.item() == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-6)


@pytest.mark.parametrize("method, params", [("kd", {}), ("textsmooth", {}), ("bilstm", {"alpha": 0.5})])
def test_regression_student_gets_a_gradient_from_the_soft_term(method, params):
    # With α the soft term's weight, the gradient of the total on the scores is α·∂soft + (1 − α)·∂hard; each
    # term's by hand: ∂/∂s mean((s − y)²) = 2(s − y)/B. logit_mse (bilstm) sums one column: the same MSE.
    scores = torch.tensor(SCORES, requires_grad=True)
    losses = get_method(method)(params).loss(type("Out", (), {"logits": scores})(),
                                             TeacherOutputs(logits=torch.tensor(TEACHER_SCORES)),
                                             {"labels": torch.tensor(FLOAT_LABELS)}, None, "train")
    soft_name = "mse" if method == "bilstm" else "kd"
    (soft_grad,) = torch.autograd.grad(losses[soft_name], scores, retain_graph=True)
    np.testing.assert_allclose(soft_grad.numpy(), 2 * (SCORES - TEACHER_SCORES) / 3, rtol=1e-9)
    alpha = get_method(method)(params).params.alpha
    (total_grad,) = torch.autograd.grad(losses["total"], scores)
    by_hand = alpha * 2 * (SCORES - TEACHER_SCORES) / 3 + (1 - alpha) * 2 * (SCORES - FLOAT_LABELS[:, None]) / 3
    np.testing.assert_allclose(total_grad.numpy(), by_hand, rtol=1e-9)
