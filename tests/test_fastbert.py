"""FastBERT: per-sample early exit on crafted entropies, the wrapped model's outputs, self-distillation that trains
the branches alone, save/load, and the speed sweep."""

import math

import numpy as np
import pytest
import torch

from conftest import toy_batch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification

from kd.models.fastbert import FastBertForSequenceClassification, fastbert_from, normalized_entropy, speed_sweep
from kd.methods import get_method
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings


LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture
def fast(tiny_teacher):
    torch.manual_seed(1)
    return fastbert_from(tiny_teacher.eval(), branch_hidden_size=8).eval()


# ---- exit logic on crafted entropies ----------------------------------------------------------------------------

class OneHotEmbeddings(nn.Module):
    """Each position's state is the one-hot of its token id, so the [CLS] state names the sample."""

    def forward(self, input_ids, token_type_ids=None):
        return F.one_hot(input_ids, 16).float()


class PassThrough(nn.Module):
    """A layer that changes nothing and records how many samples it was given."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, hidden, attention_mask=None):
        self.batch_sizes.append(hidden.shape[0])
        return hidden


# Two-class logits [a, 0] per (layer, sample): a = 0 is exactly uniform (normalised entropy 1), larger a is surer.
CRAFTED = torch.tensor([
    [5.0, 1.0, 0.5, 0.25],  # layer 1
    [5.0, 3.0, 1.0, 0.25],  # layer 2
    [5.0, 3.0, 2.0, 0.25],  # layer 3
    [5.0, 3.0, 2.0, 0.25],  # layer 4 (final)
])


def crafted_model(fast, values=CRAFTED):
    """``fast`` with identity layers and branches that return ``values`` for the sample whose [CLS] token is
    5 + sample index."""
    fast.bert.embeddings = OneHotEmbeddings()
    fast.bert.encoder.layer = nn.ModuleList(PassThrough() for _ in range(LAYERS))
    table = torch.stack([values, torch.zeros_like(values)], dim=-1)  # [layer, sample, class]
    fast.branch_logits = lambda layer, hidden: table[layer - 1, hidden[:, 0].argmax(-1) - 5]
    ids = torch.tensor([[5 + i, 1, 1] for i in range(values.shape[1])])
    return ids, table


def entropies(values):
    p = 1 / (1 + np.exp(-values.numpy()))
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)) / math.log(2)


def test_normalized_entropy_is_zero_to_one():
    assert normalized_entropy(torch.zeros(1, 5)).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert np.allclose(normalized_entropy(torch.stack([CRAFTED[0], torch.zeros(4)], -1)).numpy(),
                       entropies(CRAFTED[0]), atol=1e-6)


def test_speed_zero_exits_nobody_early(fast):
    ids, table = crafted_model(fast)
    logits, exit_layer = fast.adaptive_forward(ids, speed=0.0)
    assert exit_layer.tolist() == [LAYERS] * 4
    assert torch.equal(logits, table[-1])


def test_speed_one_exits_everybody_at_layer_one(fast):
    ids, table = crafted_model(fast)
    assert (entropies(CRAFTED[0]) < 1).all()  # non-uniform, however close (sample 3: 0.99)
    logits, exit_layer = fast.adaptive_forward(ids, speed=1.0)
    assert exit_layer.tolist() == [1] * 4
    assert torch.equal(logits, table[0])
    assert fast.bert.encoder.layer[1].batch_sizes == []  # nobody reached layer 2


def test_exactly_uniform_does_not_exit_at_speed_one(fast):
    ids, _ = crafted_model(fast, CRAFTED.clone().index_fill_(1, torch.tensor([2]), 0.0))
    _, exit_layer = fast.adaptive_forward(ids, speed=1.0)
    assert exit_layer.tolist() == [1, 1, LAYERS, 1]  # the strict "<": entropy 1 is not below 1


def test_intermediate_speed_exits_exactly_the_samples_below_it(fast):
    ids, table = crafted_model(fast)
    speed = 0.6
    by_layer = entropies(CRAFTED)  # [layer, sample]
    expected = [next((layer + 1 for layer in range(LAYERS - 1) if by_layer[layer, s] < speed), LAYERS)
                for s in range(4)]
    assert expected == [1, 2, 3, 4]  # the crafted values spread the samples over all four layers
    logits, exit_layer = fast.adaptive_forward(ids, speed=speed)
    assert exit_layer.tolist() == expected
    assert torch.equal(logits, torch.stack([table[layer - 1, s] for s, layer in enumerate(expected)]))
    # Only the samples still active are run through each layer.
    assert [layer.batch_sizes for layer in fast.bert.encoder.layer] == [[4], [3], [2], [1]]


# ---- the real model ---------------------------------------------------------------------------------------------

def test_wrapping_keeps_the_fine_tuned_outputs(tiny_teacher, fast):
    inputs = toy_batch(labels=False)
    out = fast(**inputs, output_hidden_states=True, output_branch_logits=True)
    reference = tiny_teacher.eval()(**inputs, output_hidden_states=True)
    assert torch.allclose(out.logits, reference.logits, atol=1e-6)
    assert len(out.hidden_states) == LAYERS + 1 and torch.allclose(out.hidden_states[-1], reference.hidden_states[-1])
    assert len(out.branch_logits) == LAYERS and out.branch_logits[-1] is out.logits
    assert len(fast.branches) == LAYERS - 1 and fast.branches[0][0].out_features == 8


def test_adaptive_logits_are_the_exit_branch_logits(fast):
    inputs = toy_batch(labels=False)
    branch_logits = fast(**inputs, output_branch_logits=True).branch_logits
    logits, exit_layer = fast.adaptive_forward(**inputs, speed=0.0)
    assert exit_layer.tolist() == [LAYERS] * 4 and torch.allclose(logits, branch_logits[-1], atol=1e-5)
    # A speed between the layer-1 uncertainties splits the batch, so some padded rows run on as a sub-batch.
    first = normalized_entropy(branch_logits[0])
    speed = first.median().item()
    logits, exit_layer = fast.adaptive_forward(**inputs, speed=speed)
    assert (exit_layer == 1).tolist() == (first < speed).tolist()
    for row, layer in enumerate(exit_layer.tolist()):
        assert torch.allclose(logits[row], branch_logits[layer - 1][row], atol=1e-5)


def test_save_and_load_keep_the_branches(fast, tmp_path):
    fast.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, FastBertForSequenceClassification) and loaded.config.branch_hidden_size == 8
    for ours, theirs in zip(fast.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(ours, theirs)
    inputs = toy_batch(labels=False)
    for ours, theirs in zip(fast(**inputs, output_branch_logits=True).branch_logits,
                            loaded(**inputs, output_branch_logits=True).branch_logits):
        assert torch.equal(ours, theirs)
    assert torch.equal(fast.adaptive_forward(**inputs, speed=0.5)[0], loaded.adaptive_forward(**inputs, speed=0.5)[0])


def test_loss_is_the_sum_of_branch_kls():
    final = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    branches = (torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    out = type("Out", (), {"branch_logits": (*branches, final)})
    losses = get_method("fastbert")({"temperature": 2.0}).loss(out, None, {}, None, "train")
    p = torch.softmax(final / 2, -1)
    expected = sum(4 * (p * (p.log() - torch.log_softmax(b / 2, -1))).sum(-1).mean() for b in branches)
    assert losses["total"].item() == pytest.approx(expected.item())


def test_distiller_trains_only_the_branches(tiny_teacher):
    method = get_method("fastbert")({"branch_hidden_size": 8})
    assert not method.uses_teacher
    student = method.build_student(tiny_teacher, StudentShape(layers=LAYERS))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    distiller = Distiller(method, student, None, TrainSettings(learning_rate=1e-2, warmup_ratio=0), steps_per_epoch=2)
    losses = [distiller.step(toy_batch(labels=False))["total"] for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    for name, p in student.named_parameters():
        if name.startswith("branches."):
            assert p.requires_grad and p.grad is not None and not torch.equal(p, before[name]), name
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[name]), name


def test_build_student_keeps_the_model_shape(tiny_teacher):
    method = get_method("fastbert")()
    with pytest.raises(ValueError, match="keeps its shape"):
        method.build_student(tiny_teacher, StudentShape(layers=2))


def test_speed_sweep_reports_accuracy_exits_and_latency(fast):
    inputs = toy_batch(labels=False)
    batches = [{k: v[:2] for k, v in inputs.items()}, {k: v[2:] for k, v in inputs.items()}]
    labels = fast(**inputs).logits.argmax(-1)  # the full model's own predictions
    rows = speed_sweep(fast, batches, labels, [0.0, 1.0])
    assert [row["speed"] for row in rows] == [0.0, 1.0]
    assert rows[0]["accuracy"] == 1.0 and rows[0]["avg_exit_layer"] == LAYERS
    assert rows[1]["avg_exit_layer"] == 1.0
    assert all(row["latency_ms"] > 0 for row in rows)
