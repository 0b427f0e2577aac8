"""kd.attention's implementation: eager's output, but dropout-free pre-softmax scores as the attention maps, so
TinyBERT's attention loss between a train-mode student and an eval-mode copy of it is exactly 0."""

import copy

import pytest
import torch
from transformers import BertForSequenceClassification

from kd.attention import SCORES_ATTENTION
from kd.methods import get_method
from kd.methods.base import TeacherOutputs

from conftest import tiny_bert_config, toy_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model(implementation: str, layers: int = 4) -> BertForSequenceClassification:
    """Attention dropout on, hidden dropout off: in train mode only the attention probabilities are random."""
    torch.manual_seed(0)
    bert = BertForSequenceClassification(tiny_bert_config(
        num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1))
    bert.set_attn_implementation(implementation)
    return bert


def test_output_equals_eager_and_maps_are_the_unmasked_scaled_scores():
    batch = toy_batch()
    inputs = {k: batch[k] for k in INPUTS}
    eager, scores = model("eager").eval(), model(SCORES_ATTENTION).eval()
    want = eager(**inputs, output_hidden_states=True, output_attentions=True)
    got = scores(**inputs, output_hidden_states=True, output_attentions=True)
    assert torch.equal(got.logits, want.logits)
    assert all(torch.equal(g, w) for g, w in zip(got.hidden_states, want.hidden_states, strict=True))
    # Eager's probabilities are the softmax of these scores over the real keys.
    key_mask = batch["attention_mask"][:, None, None, :].bool()
    for got_scores, probabilities in zip(got.attentions, want.attentions, strict=True):
        assert got_scores.shape == probabilities.shape == (4, 2, 5, 5)
        masked = got_scores.masked_fill(~key_mask, float("-inf"))
        torch.testing.assert_close(masked.softmax(-1), probabilities)
    # The first block's scores by hand: the embedding output's queries against its keys, before the padding mask.
    layer = scores.bert.encoder.layer[0].attention.self
    hidden = got.hidden_states[0]
    query = layer.query(hidden).view(4, 5, 2, 8).transpose(1, 2)
    key = layer.key(hidden).view(4, 5, 2, 8).transpose(1, 2)
    torch.testing.assert_close(got.attentions[0], query @ key.transpose(-1, -2) / 8**0.5)


def tinybert_attention_loss(student, teacher) -> torch.Tensor:
    batch = toy_batch()
    inputs = {k: batch[k] for k in INPUTS}
    s = student(**inputs, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    method = get_method("tinybert")()
    losses = method.loss(s, TeacherOutputs(t.logits, t.hidden_states, t.attentions), batch,
                         method.auxiliary_modules(student, teacher), "intermediate")
    return losses["attention"]


# One block: in a deeper copy, block 2 on reads states that the student's own attention dropout has changed, so its
# scores differ from the teacher's for a real reason, not for the maps' dropout.
def test_a_train_mode_copy_of_the_teacher_has_zero_attention_loss():
    teacher = model(SCORES_ATTENTION, layers=1).eval()
    student = copy.deepcopy(teacher).train()
    assert tinybert_attention_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_with_eager_attention_the_same_copy_reads_dropout_noise():
    teacher = model("eager", layers=1).eval()
    student = copy.deepcopy(teacher).train()
    assert tinybert_attention_loss(student, teacher).item() > 1e-3
