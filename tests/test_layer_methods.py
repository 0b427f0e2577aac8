"""DistilBERT, BERT-PKD and TinyBERT: every loss term against a hand computation, projections, the frozen
online teacher, TinyBERT's two phases, and a few real training steps of each method on tiny random BERTs."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from kd.attention import SCORES_ATTENTION
from kd.methods import get_method
from kd.methods.base import TeacherOutputs
from kd.methods.distilbert import DistilBertStudentOutput, mask_tokens
from kd.projections import width_projections
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings

PAD, UNK, CLS, SEP, MASK = range(5)  # the ids of conftest's tiny_tokenizer
VOCAB = 21  # its 5 special tokens and 16 words


def bert(hidden_size=16, layers=4, heads=2):
    """A tiny random classifier whose attention maps are kd.attention's scores (sdpa returns none), no dropout."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    model.set_attn_implementation(SCORES_ATTENTION)
    return model


def toy_batch(rows=4, length=7, seed=0):
    """[CLS] words [SEP] [PAD]...: row i has i padding tokens (cycling past length − 3); labels alternate."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        end = length - row % (length - 2)
        input_ids[row, 0], input_ids[row, end - 1] = CLS, SEP
        input_ids[row, end:], attention_mask[row, end:] = PAD, 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids),
            "labels": torch.arange(rows) % 2}


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def arr(*shape, seed):
    return np.random.default_rng(seed).normal(size=shape)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(t(weight))
        layer.bias.copy_(t(bias))
    return layer


STUDENT_LOGITS = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
TEACHER_LOGITS = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
MASK2x3 = np.array([[1, 1, 1], [1, 1, 0]])


def soft_ce_by_hand(temperature):
    p, q = softmax(TEACHER_LOGITS / temperature), softmax(STUDENT_LOGITS / temperature)
    return temperature**2 * np.mean(-np.sum(p * np.log(q), axis=-1))


# ---- DistilBERT -------------------------------------------------------------------------------------------------

def test_distilbert_terms_match_hand_computation_through_the_projection():
    student_last, teacher_last = arr(2, 3, 3, seed=1), arr(2, 3, 4, seed=2)
    w, b = arr(4, 3, seed=3), arr(4, seed=4)
    student_out = DistilBertStudentOutput(t(STUDENT_LOGITS), (t(arr(2, 3, 3, seed=5)), t(student_last)))
    teacher_out = TeacherOutputs(logits=t(TEACHER_LOGITS),
                                 hidden_states=(t(arr(2, 3, 4, seed=6)), t(arr(2, 3, 4, seed=7)), t(teacher_last)))
    method = get_method("distilbert")({"alpha_ce": 0.5, "alpha_cos": 3.0, "alpha_mlm": 0.0, "temperature": 2.0})
    got = method.loss(student_out, teacher_out, {"attention_mask": torch.tensor(MASK2x3)},
                      nn.ModuleDict({"hidden": linear(w, b)}), "train")

    projected = student_last @ w.T + b
    norms = np.linalg.norm(projected, axis=-1) * np.linalg.norm(teacher_last, axis=-1)
    cosines = (projected * teacher_last).sum(-1) / norms
    cos = ((1 - cosines) * MASK2x3).sum() / MASK2x3.sum()
    soft = soft_ce_by_hand(2.0)
    assert set(got) == {"soft_ce", "cos", "total"}
    assert got["soft_ce"].item() == pytest.approx(soft, rel=1e-9)
    assert got["cos"].item() == pytest.approx(cos, rel=1e-9)
    assert got["total"].item() == pytest.approx(0.5 * soft + 3.0 * cos, rel=1e-9)


def test_distilbert_without_mlm_head_warns_and_leaves_the_term_off():
    with pytest.warns(UserWarning, match="masked-LM term is off"):
        method = get_method("distilbert")()
    assert (method.params.alpha_ce, method.params.alpha_mlm, method.params.alpha_cos) == (5.0, 2.0, 1.0)
    assert method.params.temperature == 2.0
    assert set(method.auxiliary_modules(bert(layers=2), bert())) == {"hidden"}


def test_mask_tokens_chooses_15_percent_of_real_words_and_follows_80_10_10():
    batch = toy_batch(rows=400, length=30, seed=1)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    special = torch.tensor([PAD, UNK, CLS, SEP, MASK])
    masked, labels = mask_tokens(ids, attention, special, MASK, VOCAB, torch.Generator().manual_seed(7))
    chosen = labels != -100
    words = (attention == 1) & (ids >= 5)
    assert not (chosen & ~words).any(), "only real, non-special tokens are chosen"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert chosen.sum() / words.sum() == pytest.approx(0.15, abs=0.01)
    as_mask = (masked[chosen] == MASK).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()  # 10% kept, plus random draws of the same word
    assert as_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.03)
    again = mask_tokens(ids, attention, special, MASK, VOCAB, torch.Generator().manual_seed(7))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


@pytest.fixture
def mlm_folder(tmp_path, tiny_tokenizer):
    torch.manual_seed(3)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tiny_tokenizer.save_pretrained(tmp_path / "mlm")
    return tmp_path / "mlm"


def test_mlm_term_is_the_cross_entropy_of_a_masked_student_pass(mlm_folder):
    torch.manual_seed(0)
    teacher, student = bert(), bert(layers=2)
    method = get_method("distilbert")({"mlm_head": str(mlm_folder), "mlm_seed": 11})
    auxiliary = method.auxiliary_modules(student, teacher)
    saved = BertForMaskedLM.from_pretrained(mlm_folder)
    assert torch.equal(auxiliary["mlm"].head[0].dense.weight, saved.cls.predictions.transform.dense.weight)
    assert torch.equal(auxiliary["mlm"].head[1].weight, saved.bert.embeddings.word_embeddings.weight)

    batch = toy_batch(rows=6, length=12)
    student.eval()
    with torch.no_grad():
        student_out = method.student_forward(student, batch, auxiliary, "train")
        plain = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        got = method.loss(student_out, TeacherOutputs(plain.logits, plain.hidden_states), batch, auxiliary, "train")
    assert int(auxiliary["mlm"].steps) == 1, "the next step masks with the next seed"

    special = torch.tensor([PAD, UNK, CLS, SEP, MASK])
    masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], special, MASK, VOCAB,
                                 torch.Generator().manual_seed(11))
    assert (masked != batch["input_ids"]).any()
    with torch.no_grad():
        hidden = student.bert(input_ids=masked, attention_mask=batch["attention_mask"]).last_hidden_state
        logits = auxiliary["mlm"].head(hidden).numpy().astype(np.float64)
    rows, cols = np.nonzero(labels.numpy() != -100)
    log_probs = np.log(softmax(logits[rows, cols]))
    mlm = -np.mean(log_probs[np.arange(len(rows)), labels.numpy()[rows, cols]])
    assert set(got) == {"soft_ce", "mlm", "cos", "total"}
    assert got["mlm"].item() == pytest.approx(mlm, rel=1e-5)
    assert got["total"].item() == pytest.approx(5 * got["soft_ce"].item() + 2 * mlm + got["cos"].item(), rel=1e-5)


def test_mlm_head_must_fit_the_teacher_width(mlm_folder):
    method = get_method("distilbert")({"mlm_head": str(mlm_folder)})
    with pytest.raises(ValueError, match="reads width 16, the teacher's is 8"):
        method.auxiliary_modules(bert(hidden_size=8, heads=1, layers=2), bert(hidden_size=8, heads=1))


def test_distilbert_with_mlm_trains_and_saves_its_state(mlm_folder, tmp_path):
    torch.manual_seed(0)
    teacher = bert()
    method = get_method("distilbert")({"mlm_head": str(mlm_folder)})
    student = method.build_student(teacher, StudentShape(layers=2, init="every_other"))
    distiller = Distiller(method, student, teacher, TrainSettings(learning_rate=1e-3, warmup_ratio=0), 10)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    head_before = distiller.module.auxiliary["mlm"].head[1].weight.detach().clone()
    steps = [distiller.step(toy_batch(rows=6, length=12)) for _ in range(3)]
    assert all(set(losses) == {"soft_ce", "mlm", "cos", "total"} for losses in steps)
    assert all(math.isfinite(losses["total"]) and losses["mlm"] > 0 for losses in steps)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(distiller.module.auxiliary["mlm"].head[1].weight, head_before), "the head trains along"
    distiller.save_state(tmp_path / "state")  # safetensors refuses shared tensors: the copied head shares none
    assert {k for k in distiller.module.state_dict() if k.startswith("auxiliary.mlm.")} == {
        "auxiliary.mlm.steps", "auxiliary.mlm.head.0.dense.weight", "auxiliary.mlm.head.0.dense.bias",
        "auxiliary.mlm.head.0.LayerNorm.weight", "auxiliary.mlm.head.0.LayerNorm.bias",
        "auxiliary.mlm.head.1.weight", "auxiliary.mlm.head.1.bias"}


# ---- BERT-PKD ---------------------------------------------------------------------------------------------------

def test_pkd_terms_match_hand_computation():
    # student of 3 layers, teacher of 6: PKD-skip pairs (1, 2) and (2, 4); the top student layer is left out.
    student_hidden = [arr(2, 3, 4, seed=10 + i) for i in range(4)]
    teacher_hidden = [arr(2, 3, 4, seed=20 + i) for i in range(7)]
    labels = np.array([1, 2])
    student_out = SimpleNamespace(logits=t(STUDENT_LOGITS), hidden_states=tuple(map(t, student_hidden)))
    teacher_out = TeacherOutputs(logits=t(TEACHER_LOGITS), hidden_states=tuple(map(t, teacher_hidden)))
    method = get_method("pkd")({"temperature": 3.0, "alpha": 0.3, "beta": 50.0})
    got = method.loss(student_out, teacher_out, {"labels": torch.tensor(labels)},
                      nn.ModuleDict({"cls": nn.Identity()}), "train")

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    patient = sum(np.mean((unit(student_hidden[j][:, 0]) - unit(teacher_hidden[m][:, 0])) ** 2)
                  for j, m in [(1, 2), (2, 4)])
    ce = -np.mean(np.log(softmax(STUDENT_LOGITS))[np.arange(2), labels])
    p, q = softmax(TEACHER_LOGITS / 3.0), softmax(STUDENT_LOGITS / 3.0)
    kd = 9.0 * np.mean(np.sum(p * np.log(p / q), axis=-1))
    assert got["patient"].item() == pytest.approx(patient, rel=1e-9)
    assert got["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert got["kd"].item() == pytest.approx(kd, rel=1e-9)
    assert got["total"].item() == pytest.approx(0.7 * ce + 0.3 * kd + 50.0 * patient, rel=1e-9)


def test_pkd_defaults():
    p = get_method("pkd")().params
    assert (p.temperature, p.alpha, p.beta, p.strategy) == (10.0, 0.5, 100.0, "skip")


# ---- TinyBERT ---------------------------------------------------------------------------------------------------

def attention_scores(batch, heads, length, seed):
    return arr(batch, heads, length, length, seed=seed)


def masked_mse(a, b, weights):
    return float(((a - b) ** 2 * weights).sum() / np.broadcast_to(weights, a.shape).sum())


@pytest.mark.parametrize("student_heads", [2, 1])
def test_tinybert_intermediate_terms_match_hand_computation(student_heads):
    # student 2 layers of width 3, teacher 4 layers of width 4 and 2 heads: uniform pairs (1, 2), (2, 4).
    mask = MASK2x3
    student_hidden = [arr(2, 3, 3, seed=30 + i) for i in range(3)]
    teacher_hidden = [arr(2, 3, 4, seed=40 + i) for i in range(5)]
    student_att = [attention_scores(2, student_heads, 3, seed=50 + i) for i in range(2)]
    teacher_att = [attention_scores(2, 2, 3, seed=60 + i) for i in range(4)]
    w_e, b_e, w_h, b_h = arr(4, 3, seed=70), arr(4, seed=71), arr(4, 3, seed=72), arr(4, seed=73)
    student_out = SimpleNamespace(logits=t(STUDENT_LOGITS), hidden_states=tuple(map(t, student_hidden)),
                                  attentions=tuple(map(t, student_att)))
    teacher_out = TeacherOutputs(logits=t(TEACHER_LOGITS), hidden_states=tuple(map(t, teacher_hidden)),
                                 attentions=tuple(map(t, teacher_att)))
    method = get_method("tinybert")({"weights": {"embedding": 2.0, "attention": 3.0, "hidden": 0.5}})
    auxiliary = nn.ModuleDict({"embedding": linear(w_e, b_e), "hidden": linear(w_h, b_h)})
    got = method.loss(student_out, teacher_out, {"attention_mask": torch.tensor(mask)}, auxiliary, "intermediate")

    tokens = mask[:, :, None]
    embedding = masked_mse(student_hidden[0] @ w_e.T + b_e, teacher_hidden[0], tokens)
    hidden = sum(masked_mse(student_hidden[s] @ w_h.T + b_h, teacher_hidden[m], tokens) for s, m in [(1, 2), (2, 4)])
    pairs = (mask[:, None, :, None] * mask[:, None, None, :]).astype(float)  # (batch, 1, query, key)
    attention = 0.0
    for s, m in [(1, 2), (2, 4)]:
        a_s, a_t = student_att[s - 1], teacher_att[m - 1]
        if student_heads != 2:  # different head counts: each side averaged over its heads
            a_s, a_t = a_s.mean(1, keepdims=True), a_t.mean(1, keepdims=True)
        attention += masked_mse(a_s, a_t, pairs)
    assert set(got) == {"embedding", "attention", "hidden", "total"}
    assert got["embedding"].item() == pytest.approx(embedding, rel=1e-9)
    assert got["hidden"].item() == pytest.approx(hidden, rel=1e-9)
    assert got["attention"].item() == pytest.approx(attention, rel=1e-9)
    assert got["total"].item() == pytest.approx(2.0 * embedding + 3.0 * attention + 0.5 * hidden, rel=1e-9)


def test_tinybert_prediction_is_soft_cross_entropy():
    method = get_method("tinybert")({"temperature": 2.5})
    got = method.loss(SimpleNamespace(logits=t(STUDENT_LOGITS)), TeacherOutputs(logits=t(TEACHER_LOGITS)), {},
                      nn.ModuleDict(), "prediction")
    assert set(got) == {"soft_ce", "total"}
    assert got["total"].item() == pytest.approx(soft_ce_by_hand(2.5), rel=1e-9)


def test_tinybert_refuses_missing_attentions_and_unknown_phases():
    batch = toy_batch()
    teacher, student = bert(), bert(layers=2)
    student.set_attn_implementation("sdpa")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    student_out = student(**inputs, output_hidden_states=True, output_attentions=True)
    teacher_out = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    teacher_out = TeacherOutputs(teacher_out.logits, teacher_out.hidden_states, teacher_out.attentions)
    method = get_method("tinybert")()
    with pytest.raises(ValueError, match=f"{SCORES_ATTENTION}.*sdpa returns no attention maps"):
        method.loss(student_out, teacher_out, batch, method.auxiliary_modules(student, teacher), "intermediate")
    with pytest.raises(ValueError, match="no phase 'train'"):
        method.loss(student_out, teacher_out, batch, nn.ModuleDict(), "train")


def test_tinybert_runs_intermediate_then_prediction():
    torch.manual_seed(0)
    teacher = bert()
    method = get_method("tinybert")({"intermediate_epochs": 2})
    assert [(p.name, p.epochs) for p in method.phases()] == [("intermediate", 2), ("prediction", None)]
    student = method.build_student(teacher, StudentShape(layers=2))
    student.set_attn_implementation(SCORES_ATTENTION)
    distiller = Distiller(method, student, teacher, TrainSettings(epochs=1, learning_rate=1e-3), 2)
    classifier = student.classifier.weight.detach().clone()
    seen = []
    while not distiller.finished:
        phase = distiller.phases[distiller.progress.phase_index].name
        seen.append((phase, set(distiller.run_epoch([toy_batch()] * 2, lambda _: None))))
        if phase == "intermediate":
            assert torch.equal(student.classifier.weight, classifier), "the intermediate loss does not reach it"
    intermediate = {"loss/embedding", "loss/attention", "loss/hidden", "loss/total"}
    assert seen == [("intermediate", intermediate), ("intermediate", intermediate),
                    ("prediction", {"loss/soft_ce", "loss/total"})]
    assert not torch.equal(student.classifier.weight, classifier)


# ---- projections ------------------------------------------------------------------------------------------------

def test_narrow_student_gets_a_linear_map_to_the_teacher_width():
    modules = width_projections(bert(hidden_size=8, heads=1, layers=2), bert(), ["hidden"])
    assert isinstance(modules["hidden"], nn.Linear)
    assert (modules["hidden"].in_features, modules["hidden"].out_features) == (8, 16)


def test_same_width_needs_no_projection_parameters():
    modules = width_projections(bert(layers=2), bert(), ["embedding", "hidden"])
    assert sum(p.numel() for p in modules.parameters()) == 0


def test_projections_need_the_teacher():
    with pytest.raises(ValueError, match="need the teacher"):
        width_projections(bert(layers=2), None, ["hidden"])


@pytest.mark.parametrize("name, keys", [("distilbert", {"hidden"}), ("pkd", {"cls"}),
                                        ("tinybert", {"embedding", "hidden"})])
def test_each_method_projects_a_narrow_student(name, keys):
    modules = get_method(name)({"alpha_mlm": 0} if name == "distilbert" else {}).auxiliary_modules(
        bert(hidden_size=8, heads=1, layers=2), bert())
    assert set(modules) == keys
    assert all(isinstance(m, nn.Linear) and m.weight.shape == (16, 8) for m in modules.values())
    assert len({id(m) for m in modules.values()}) == len(keys), "W_e and W_h are separate maps"


# ---- training with the online teacher ---------------------------------------------------------------------------

CASES = [
    ("distilbert", {"alpha_mlm": 0}, {}),
    ("pkd", {"temperature": 2.0}, {}),
    ("tinybert", {}, {}),
    ("distilbert", {"alpha_mlm": 0}, {"hidden_size": 8}),
    ("pkd", {"temperature": 2.0}, {"hidden_size": 8}),
    ("tinybert", {}, {"hidden_size": 8}),
]


def distiller_for(name, params, shape, steps=10):
    torch.manual_seed(0)
    teacher = bert()
    method = get_method(name)(params)
    student = method.build_student(teacher, StudentShape(**{"layers": 2, "init": method.default_init, **shape}))
    student.set_attn_implementation(SCORES_ATTENTION)
    return Distiller(method, student, teacher, TrainSettings(learning_rate=2e-3, warmup_ratio=0, epochs=1), steps)


@pytest.mark.parametrize("name, params, shape", CASES)
def test_one_step_trains_the_student_and_not_the_teacher(name, params, shape):
    distiller = distiller_for(name, params, shape)
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in distiller.module.state_dict().items()}
    distiller.step(toy_batch())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in distiller.teacher.state_dict().items())
    changed = {k for k, v in distiller.module.state_dict().items() if not torch.equal(v, trainable_before[k])}
    assert any(k.startswith("student.bert.encoder.") for k in changed)
    projections = {k for k in trainable_before if k.startswith("auxiliary.")}
    assert projections <= changed and bool(projections) == bool(shape)


@pytest.mark.parametrize("name, params, shape", CASES)
def test_a_few_steps_lower_the_loss(name, params, shape):
    # A random start: one copied from the teacher's layers begins almost at the loss's floor.
    distiller = distiller_for(name, params, {**shape, "init": "random"})
    batch = toy_batch()
    losses = [distiller.step(batch)["total"] for _ in range(10)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
