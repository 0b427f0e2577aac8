"""TextSmooth's smoothed inputs, t̃ = λ·onehot(t) + (1 − λ)·p̃, and the "textsmooth" method."""

import math

import pytest
import torch

from kd.methods import get_method
from kd.methods.base import TeacherOutputs
from kd.students import StudentShape
from kd.textsmooth import smoothed_distribution, smoothed_inputs_embeds
from kd.training import Distiller, TrainSettings

V, H = 12, 4
INPUT_IDS = torch.tensor([[2, 7, 5, 0]])  # the last position is padding
TOPK_IDS = torch.tensor([[[3, 4, 9], [7, 8, 1], [5, 6, 10], [0, 0, 0]]], dtype=torch.int32)
# Stored top-k mass does not sum to 1 (the rest of the vocabulary was cut); padding has none.
TOPK_PROBS = torch.tensor([[[0.3, 0.1, 0.1], [0.4, 0.2, 0.2], [0.5, 0.25, 0.25], [0.0, 0.0, 0.0]]], dtype=torch.float16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mixture_sums_to_one_and_matches_the_hand_computed_weights():
    dense = smoothed_distribution(INPUT_IDS, TOPK_IDS, TOPK_PROBS, V, lam=0.5)
    assert torch.allclose(dense.sum(-1), torch.ones(1, 4))
    # Position 0: t = 2, p̃ = (0.3, 0.1, 0.1) / 0.5 on ids 3, 4, 9.
    assert dense[0, 0, 2].item() == pytest.approx(0.5)
    assert [dense[0, 0, i].item() for i in (3, 4, 9)] == pytest.approx([0.3, 0.1, 0.1], abs=1e-3)  # float16 input
    # Position 1: the token is also the MLM's first guess, so the two masses add: 0.5 + 0.5 · 0.5.
    assert dense[0, 1, 7].item() == pytest.approx(0.75)
    # Padding has no stored distribution and keeps its one-hot.
    assert torch.equal(dense[0, 3], torch.nn.functional.one_hot(torch.tensor(0), V).float())


def test_lambda_one_is_exactly_the_token_embedding():
    embedding = torch.nn.Embedding(V, H)
    embeds = smoothed_inputs_embeds(INPUT_IDS, TOPK_IDS, TOPK_PROBS, embedding.weight, lam=1.0)
    assert torch.equal(embeds, embedding(INPUT_IDS))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5])
def test_sparse_embeds_equal_the_dense_distribution_times_e(lam):
    weight = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    sparse = smoothed_inputs_embeds(INPUT_IDS, TOPK_IDS, TOPK_PROBS, weight, lam)
    dense = smoothed_distribution(INPUT_IDS, TOPK_IDS, TOPK_PROBS, V, lam) @ weight
    assert torch.allclose(sparse, dense, atol=1e-6)


def test_gradient_reaches_only_the_gathered_rows():
    weight = torch.randn(V, H, requires_grad=True)
    smoothed_inputs_embeds(INPUT_IDS, TOPK_IDS, TOPK_PROBS, weight, 0.5).sum().backward()
    touched = set(INPUT_IDS.flatten().tolist()) | set(TOPK_IDS[0, :3].flatten().tolist())
    assert {i for i in range(V) if weight.grad[i].abs().sum() > 0} == touched


def smoothing_batch(input_ids):
    ids = torch.tensor(input_ids)
    k = 3
    topk_ids = (ids.unsqueeze(-1) + torch.arange(1, k + 1)) % 21  # the tiny BERT's vocabulary has 21 tokens
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
        "mlm_topk_ids": topk_ids, "mlm_topk_probs": torch.full((*ids.shape, k), 0.2, dtype=torch.float16),
        "labels": torch.tensor([1, 0]), "teacher_logits": torch.tensor([[-1.0, 1.0], [1.5, -0.5]]),
    }


def test_student_reads_smoothed_embeddings_in_training_and_ids_at_inference(tiny_teacher):
    method = get_method("textsmooth")({"lam": 0.5})
    assert method.default_init == "bottom" and method.cached_signals == {"logits", "mlm_topk"}
    student = method.build_student(tiny_teacher, StudentShape(layers=2, init="bottom")).eval()
    batch = smoothing_batch([[2, 5, 6, 3], [2, 9, 10, 3]])
    embeds = smoothed_inputs_embeds(batch["input_ids"], batch["mlm_topk_ids"], batch["mlm_topk_probs"],
                                    student.get_input_embeddings().weight, 0.5)
    trained_view = method.student_forward(student, batch, None, "train").logits
    assert torch.allclose(trained_view, student(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits)
    assert not torch.allclose(trained_view, student(input_ids=batch["input_ids"]).logits)
    one_hot_view = get_method("textsmooth")({"lam": 1.0}).student_forward(student, batch, None, "train").logits
    assert torch.allclose(one_hot_view, student(input_ids=batch["input_ids"]).logits, atol=1e-6)
    with pytest.raises(KeyError, match="masked-LM top-k"):
        method.student_forward(student, {k: v for k, v in batch.items() if k != "mlm_topk_probs"}, None, "train")


def test_loss_is_tempered_kl_plus_weighted_cross_entropy():
    student = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 4.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])
    temperature, alpha = 2.0, 0.7

    def softmax(row, t):
        exps = [math.exp(z / t) for z in row]
        return [e / sum(exps) for e in exps]

    kl = sum(
        sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(t_row, temperature), softmax(s_row, temperature)))
        for s_row, t_row in zip(student.tolist(), teacher.tolist())
    ) / 2 * temperature**2
    ce = -(math.log(softmax(student[0].tolist(), 1)[1]) + math.log(softmax(student[1].tolist(), 1)[0])) / 2
    method = get_method("textsmooth")({"temperature": temperature, "alpha": alpha})
    student_out = type("Out", (), {"logits": student})
    out = method.loss(student_out, TeacherOutputs(logits=teacher), {"labels": labels}, None, "train")
    assert out["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert out["total"].item() == pytest.approx(alpha * kl + (1 - alpha) * ce, rel=1e-5)


def test_distiller_trains_through_the_student_forward_hook(tiny_teacher):
    torch.manual_seed(0)
    method = get_method("textsmooth")({"temperature": 1.0})
    student = method.build_student(tiny_teacher, StudentShape(layers=1, init="bottom"))
    batch = smoothing_batch([[2, 5, 6, 3], [2, 9, 10, 3]])
    distiller = Distiller(method, student, None, TrainSettings(learning_rate=5e-3, warmup_ratio=0), steps_per_epoch=30)
    losses = [distiller.step(batch)["total"] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
