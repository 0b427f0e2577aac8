"""The MobileBERT-style bottleneck student and the "mobilebert" method: widths, attention maps, save/load, the
attention-transfer KL against a hand computation, the layer map, and both phases through the Distiller."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from kd.attention import SCORES_ATTENTION
from kd.methods import get_method
from kd.methods.base import TeacherOutputs
from kd.methods.mobilebert import attention_kl
from kd.models.mobilebert import BottleneckBertConfig, BottleneckBertForSequenceClassification
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings

from conftest import toy_batch, tiny_bert_config

INTER, INTRA = 8, 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def bottleneck(layers=2, heads=3):
    torch.manual_seed(0)
    config = BottleneckBertConfig(vocab_size=21, hidden_size=INTER, intra_size=INTRA, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=32, max_position_embeddings=32,
                                  num_labels=2)
    return BottleneckBertForSequenceClassification(config).eval()


def scores_teacher():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    teacher.set_attn_implementation(SCORES_ATTENTION)
    return teacher


def test_inter_and_intra_widths():
    model = bottleneck()
    layer = model.layers[0]
    assert (layer.bottleneck_in.in_features, layer.bottleneck_in.out_features) == (INTER, INTRA)
    assert (layer.bottleneck_out.in_features, layer.bottleneck_out.out_features) == (INTRA, INTER)
    assert model.get_input_embeddings().weight.shape == (21, INTER)
    intra_inputs = []
    layer.attention.register_forward_hook(lambda module, args, out: intra_inputs.append(args[0].shape))
    batch = toy_batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                output_attentions=True)
    assert out.logits.shape == (4, 2)
    assert [h.shape for h in out.hidden_states] == [(4, 5, INTER)] * 3  # embeddings + 2 blocks, inter width
    assert intra_inputs == [(4, 5, INTRA)]  # attention runs at the intra width
    assert [a.shape for a in out.attentions] == [(4, 3, 5, 5)] * 2
    assert out.attentions[0][1, :, :, 3:].abs().min() > 0  # the scores before the padding mask is added
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert plain.hidden_states is None and plain.attentions is None


def test_save_and_load_with_the_auto_class(tmp_path):
    model = bottleneck()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BottleneckBertForSequenceClassification) and loaded.config.intra_size == INTRA
    batch = toy_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def random_scores(batch, heads, n, seed):
    return np.random.default_rng(seed).normal(size=(batch, heads, n, n))


def key_softmax(scores, mask):
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_attention_kl_matches_hand_computation():
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    teacher_scores, student_scores = random_scores(2, 2, 4, seed=0), random_scores(2, 2, 4, seed=1)
    teacher, student = key_softmax(teacher_scores, mask), key_softmax(student_scores, mask)
    by_hand, count = 0.0, 0
    for b in range(2):
        for h in range(2):
            for q in range(4):
                if mask[b, q]:
                    p, r = teacher[b, h, q], student[b, h, q]
                    by_hand += sum(p[k] * math.log(p[k] / r[k]) for k in range(4) if p[k] > 0)
                    count += 1
    value = attention_kl(torch.tensor(student_scores), torch.tensor(teacher_scores), torch.tensor(mask))
    assert value.item() == pytest.approx(by_hand / count)
    same = attention_kl(torch.tensor(teacher_scores), torch.tensor(teacher_scores), torch.tensor(mask))
    assert same.item() == pytest.approx(0)


def test_attention_kl_averages_heads_when_counts_differ():
    mask = np.ones((1, 3))
    teacher_scores, student_scores = random_scores(1, 2, 3, seed=2), random_scores(1, 3, 3, seed=3)
    p, r = key_softmax(teacher_scores, mask).mean(1), key_softmax(student_scores, mask).mean(1)  # one map each
    by_hand = np.mean(np.sum(p * np.log(p / r), axis=-1))
    assert attention_kl(torch.tensor(student_scores), torch.tensor(teacher_scores)).item() == pytest.approx(by_hand)


def test_bottleneck_attention_maps_are_free_of_attention_dropout():
    torch.manual_seed(0)
    config = BottleneckBertConfig(vocab_size=21, hidden_size=INTER, intra_size=INTRA, num_hidden_layers=1,
                                  num_attention_heads=3, intermediate_size=32, max_position_embeddings=32,
                                  num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model = BottleneckBertForSequenceClassification(config)
    batch = toy_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    trained = model.train()(**inputs, output_attentions=True)
    evaluated = model.eval()(**inputs, output_attentions=True)
    assert not torch.equal(trained.logits, evaluated.logits)  # the dropout is on
    assert torch.equal(trained.attentions[0], evaluated.attentions[0])
    # xlogy and log are different kernels, which disagree in the last bit on some CPUs (1e-9 on an AMD EPYC);
    # maps after dropout at 0.5 would be orders of magnitude apart.
    assert attention_kl(trained.attentions[0], evaluated.attentions[0],
                        batch["attention_mask"]).item() == pytest.approx(0, abs=1e-7)


def test_method_builds_a_bottleneck_student_from_the_teacher(tiny_teacher):
    method = get_method("mobilebert")({"intra_size": INTRA})
    student = method.build_student(tiny_teacher, StudentShape(layers=2, hidden_size=INTER))
    c = student.config
    assert (c.hidden_size, c.intra_size, c.num_hidden_layers, c.num_attention_heads) == (INTER, INTRA, 2, 2)
    assert (c.vocab_size, c.num_labels, c.intermediate_size) == (21, 2, 4 * INTRA)
    assert c._attn_implementation == SCORES_ATTENTION  # what its attentions are, so asking for them is a no-op
    default = get_method("mobilebert")().build_student(tiny_teacher, StudentShape(layers=1))
    assert (default.config.hidden_size, default.config.intra_size) == (128, 16)  # inter 128, intra the teacher's
    with pytest.raises(ValueError, match="starts at random"):
        method.build_student(tiny_teacher, StudentShape(layers=2, hidden_size=INTER, init="bottom"))


def test_intermediate_loss_maps_layers_uniformly():
    method = get_method("mobilebert")({"weights": {"hidden": 2.0, "attention": 3.0}})
    student, teacher = bottleneck(layers=2, heads=2), scores_teacher()
    auxiliary = method.auxiliary_modules(student, teacher)
    batch = toy_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    s = student(**inputs, output_hidden_states=True, output_attentions=True)
    t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    losses = method.loss(s, TeacherOutputs(t.logits, t.hidden_states, t.attentions), batch, auxiliary, "intermediate")
    mask = batch["attention_mask"]
    hidden = attention = 0.0
    for m, g in ((1, 2), (2, 4)):  # uniform 4 → 2: student layer m learns from teacher layer 2m
        diff = (auxiliary["hidden"](s.hidden_states[m]) - t.hidden_states[g]) ** 2
        hidden += (diff * mask[..., None]).sum() / (mask.sum() * diff.shape[-1])
        attention += attention_kl(s.attentions[m - 1], t.attentions[g - 1], mask)
    assert losses["hidden"].item() == pytest.approx(hidden.item(), rel=1e-5)
    assert losses["attention"].item() == pytest.approx(attention.item(), rel=1e-5)
    assert losses["total"].item() == pytest.approx(2 * hidden.item() + 3 * attention.item(), rel=1e-5)


def test_sdpa_teacher_is_refused():
    method = get_method("mobilebert")()
    out = SimpleNamespace(logits=torch.zeros(1, 2), hidden_states=(torch.zeros(1, 1, 8),) * 2, attentions=())
    with pytest.raises(ValueError, match=f"{SCORES_ATTENTION}.*sdpa returns no attention maps"):
        method.loss(out, TeacherOutputs(torch.zeros(1, 2), (torch.zeros(1, 1, 16),) * 2, None), {}, None,
                    "intermediate")


def test_distiller_runs_both_phases_with_a_frozen_teacher():
    teacher = scores_teacher()
    method = get_method("mobilebert")({"intermediate_epochs": 1, "prediction_epochs": 1})
    student = method.build_student(teacher, StudentShape(layers=2, hidden_size=INTER))
    distiller = Distiller(method, student, teacher, TrainSettings(learning_rate=1e-3, warmup_ratio=0),
                          steps_per_epoch=1)
    assert [phase.name for phase in distiller.phases] == ["intermediate", "prediction"]
    projection = distiller.module.auxiliary["hidden"].weight
    start = projection.detach().clone()
    first = distiller.run_epoch([toy_batch()], report=lambda _: None)
    assert not torch.equal(projection, start)  # the map to the teacher's width trains in the intermediate phase
    second = distiller.run_epoch([toy_batch()], report=lambda _: None)
    assert set(first) == {"loss/hidden", "loss/attention", "loss/total"}
    assert set(second) == {"loss/soft_ce", "loss/total"}
    assert distiller.finished and all(math.isfinite(v) for v in (*first.values(), *second.values()))
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
