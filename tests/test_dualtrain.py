"""DualTrain + SharedProj: the student's WordPiece vocabulary, mixed segmentations and their batches, the one
shared projection, the mixed embedding, unit pooling, the compression report and a Distiller step."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertForSequenceClassification

from kd.models.dualtrain import (
    SharedProjection,
    compression_report,
    dual_batch,
    dual_segmentation,
    mixed_inputs_embeds,
    pool_units,
    split_words,
    train_wordpiece,
)
from kd.methods import get_method
from kd.methods.base import TeacherOutputs
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings

from conftest import tiny_bert_config

CORPUS = ["The movie was good", "the film is not very fun", "a great plot!", "The actor was awful", "a dull film",
          "bad plot", "the plot was very dull", "not a good movie"] * 3
SENTENCE = "The movie was not very good"
STUDENT_VOCAB = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def student_tokenizer():
    return train_wordpiece(CORPUS, vocab_size=STUDENT_VOCAB)


# ---- vocabulary and segmentation ------------------------------------------------------------------------------

def test_wordpiece_vocabulary_round_trips(student_tokenizer, tmp_path):
    assert len(student_tokenizer) == STUDENT_VOCAB
    assert student_tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    encoded = student_tokenizer(SENTENCE)
    tokens = student_tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and any(t.startswith("##") for t in tokens)  # words split
    assert "[UNK]" not in tokens
    assert student_tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == SENTENCE.lower()
    assert student_tokenizer("good plot", "a film")["token_type_ids"][-4:] == [1, 1, 1, 1]
    student_tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(SENTENCE)["input_ids"] == encoded["input_ids"]


def test_split_words_uses_the_teacher_normaliser(tiny_tokenizer):
    assert split_words("The Movie, was good!", tiny_tokenizer) == ["the", "movie", ",", "was", "good", "!"]


def test_dual_segmentation_ends_are_the_pure_segmentations(tiny_tokenizer, student_tokenizer):
    words = split_words(SENTENCE, tiny_tokenizer)
    teacher = dual_segmentation(words, tiny_tokenizer, student_tokenizer, 1.0, random.Random(0))
    student = dual_segmentation(words, tiny_tokenizer, student_tokenizer, 0.0, random.Random(0))
    assert teacher.tokens == tiny_tokenizer.tokenize(SENTENCE) and all(teacher.from_teacher)
    assert teacher.ids == tiny_tokenizer.convert_tokens_to_ids(teacher.tokens)
    assert student.tokens == student_tokenizer.tokenize(SENTENCE) and not any(student.from_teacher)
    assert student.ids == student_tokenizer.convert_tokens_to_ids(student.tokens)
    assert len(student.tokens) > len(teacher.tokens)  # the small vocabulary splits words into more pieces


def test_dual_segmentation_mixes_both_vocabularies(tiny_tokenizer, student_tokenizer):
    words = split_words(SENTENCE, tiny_tokenizer)
    mixed = dual_segmentation(words, tiny_tokenizer, student_tokenizer, 0.5, np.random.default_rng(0))
    assert set(mixed.from_teacher) == {True, False}
    for w, word in enumerate(words):
        pieces = [t for t, i in zip(mixed.tokens, mixed.word_ids) if i == w]
        sources = {s for s, i in zip(mixed.from_teacher, mixed.word_ids) if i == w}
        assert len(sources) == 1  # a word is segmented wholly by one vocabulary
        reference = tiny_tokenizer if sources.pop() else student_tokenizer
        assert pieces == reference.tokenize(word)
    offset = mixed.mixed_ids(STUDENT_VOCAB)
    assert offset == [i + STUDENT_VOCAB if t else i for i, t in zip(mixed.ids, mixed.from_teacher)]


def test_dual_batch_aligns_units_across_segmentations(tiny_tokenizer, student_tokenizer):
    batch = dual_batch([SENTENCE, ("a great plot", "bad film")], tiny_tokenizer, student_tokenizer, 0.0,
                       random.Random(0), STUDENT_VOCAB, labels=[1, 0])
    teacher_row = batch["input_ids"][0][batch["attention_mask"][0] > 0]
    student_row = batch["student_input_ids"][0][batch["student_attention_mask"][0] > 0]
    assert teacher_row.tolist() == tiny_tokenizer(SENTENCE)["input_ids"]
    assert student_row.tolist() == student_tokenizer(SENTENCE)["input_ids"]
    pair = student_tokenizer("a great plot", "bad film")
    width = len(pair["input_ids"])
    assert batch["student_input_ids"][1, :width].tolist() == pair["input_ids"]
    assert batch["student_token_type_ids"][1, :width].tolist() == pair["token_type_ids"]
    assert batch["student_unit_ids"][1, width:].tolist() == [-1] * (batch["student_unit_ids"].shape[1] - width)
    for row in range(2):  # the same units, in the same order, on both sides
        teacher_units = batch["unit_ids"][row][batch["attention_mask"][row] > 0].unique_consecutive()
        student_units = batch["student_unit_ids"][row][batch["student_attention_mask"][row] > 0].unique_consecutive()
        assert torch.equal(teacher_units, student_units)
    assert batch["labels"].tolist() == [1, 0]
    short = dual_batch([SENTENCE], tiny_tokenizer, student_tokenizer, 0.0, random.Random(0), STUDENT_VOCAB,
                       max_length=8)
    assert short["student_input_ids"].shape[1] <= 8
    assert short["student_unit_ids"].max() == short["unit_ids"].max()  # both sides dropped the same words
    with pytest.raises(ValueError, match="student's table"):
        dual_batch([SENTENCE], tiny_tokenizer, student_tokenizer, 0.0, random.Random(0), STUDENT_VOCAB - 1)


# ---- projection, mixed embedding, pooling ---------------------------------------------------------------------

def test_shared_projection_shapes_and_directions():
    x_teacher, x_student = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    down = SharedProjection(16, 8, "down")
    assert down.weight.shape == (16, 8) and down(x_teacher).shape == (2, 5, 8)
    assert down.to_student(x_teacher).shape == (2, 5, 8) and down.to_teacher(x_student).shape == (2, 5, 16)
    up = SharedProjection(16, 8, "up")
    assert up.weight.shape == (8, 16) and up(x_student).shape == (2, 5, 16)
    assert up.to_teacher(x_student).shape == (2, 5, 16) and up.to_student(x_teacher).shape == (2, 5, 8)
    assert torch.allclose(up.to_student(up.to_teacher(x_student)), x_student)  # Uᵀ inverts the semi-orthogonal U
    assert [p for p in up.parameters()] == [up.weight]
    with pytest.raises(ValueError, match="'down' or 'up'"):
        SharedProjection(16, 8, "sideways")


def test_mixed_embedding_reads_both_tables():
    torch.manual_seed(0)
    student_table, teacher_table = nn.Embedding(6, 4), nn.Embedding(10, 8)
    projection = SharedProjection(8, 4, "down")
    with torch.no_grad():
        projection.weight.normal_()
    ids = torch.tensor([[2, 6 + 7, 5], [6 + 0, 1, 6 + 9]])
    embeds = mixed_inputs_embeds(ids, student_table, teacher_table, projection)
    assert torch.equal(embeds[0, 0], student_table.weight[2]) and torch.equal(embeds[1, 1], student_table.weight[1])
    assert torch.allclose(embeds[0, 1], teacher_table.weight[7] @ projection.weight)
    assert torch.allclose(embeds[1, 2], teacher_table.weight[9] @ projection.weight)


def test_pool_units_averages_each_units_pieces():
    hidden = torch.arange(12.0).view(1, 6, 2)
    units = torch.tensor([[0, 1, 1, 1, 3, -1]])
    pooled, present = pool_units(hidden, units, 4)
    assert present.tolist() == [[True, True, False, True]]
    assert pooled[0].tolist() == [[0.0, 1.0], [4.0, 5.0], [0.0, 0.0], [8.0, 9.0]]


# ---- the method -----------------------------------------------------------------------------------------------

@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_student_has_the_small_vocabulary_and_width(teacher):
    method = get_method("dualtrain")({"vocab_size": STUDENT_VOCAB})
    student = method.build_student(teacher, StudentShape(layers=2, hidden_size=8))
    assert student.get_input_embeddings().weight.shape == (STUDENT_VOCAB, 8)
    assert (student.config.vocab_size, student.config.hidden_size, student.config.num_hidden_layers) == (
        STUDENT_VOCAB, 8, 2)
    same_width = method.build_student(teacher, StudentShape(layers=2, init="bottom"))
    assert torch.equal(same_width.bert.encoder.layer[1].output.dense.weight,
                       teacher.bert.encoder.layer[1].output.dense.weight)  # blocks copied at the teacher's width
    assert same_width.get_input_embeddings().weight.shape == (STUDENT_VOCAB, 16)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_projection_serves_every_mapped_layer(teacher, tiny_tokenizer, student_tokenizer, direction):
    method = get_method("dualtrain")({"vocab_size": STUDENT_VOCAB, "direction": direction})
    student = method.build_student(teacher, StudentShape(layers=2, hidden_size=8))
    auxiliary = method.auxiliary_modules(student, teacher)
    trainable = [p for p in auxiliary.parameters() if p.requires_grad]
    assert trainable == [auxiliary["projection"].weight]  # the teacher's embedding copy is frozen
    batch = dual_batch(CORPUS[:3], tiny_tokenizer, student_tokenizer, 0.5, random.Random(0), STUDENT_VOCAB,
                       labels=[0, 1, 0])
    student_out = method.student_forward(student, batch, auxiliary, "train")
    with torch.no_grad():
        t = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                    output_hidden_states=True)
    calls = []
    auxiliary["projection"].register_forward_hook(lambda module, args, out: calls.append(module))
    losses = method.loss(student_out, TeacherOutputs(t.logits, t.hidden_states), batch, auxiliary, "train")
    assert len(calls) == 2 and all(module is auxiliary["projection"] for module in calls)  # 2 mapped layers, 1 U
    losses["total"].backward()
    assert auxiliary["projection"].weight.grad is not None and auxiliary["teacher_embeddings"].weight.grad is None
    assert set(losses) == {"soft_ce", "ce", "hidden", "total"}


def test_hidden_loss_is_zero_when_the_projection_matches():
    """Through an up projection that maps the student's states onto the teacher's exactly, the per-unit MSE is 0
    however the two sides segment the units."""
    method = get_method("dualtrain")({"alpha": 1.0, "beta": 1.0})
    projection = SharedProjection(4, 2, "up")
    teacher_units = torch.tensor([[0, 1, 2, -1]])
    student_units = torch.tensor([[0, 1, 1, 2]])
    student_states = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [5.0, 2.0], [0.0, 1.0]]])
    pooled = torch.tensor([[[1.0, 2.0], [4.0, 1.0], [0.0, 1.0]]])  # units averaged on the student side
    teacher_states = torch.cat([projection(pooled), torch.zeros(1, 1, 4)], dim=1)
    student_out = type("Out", (), {"logits": torch.zeros(1, 2), "hidden_states": (student_states,) * 2})
    teacher_out = TeacherOutputs(torch.zeros(1, 2), (teacher_states,) * 2)
    batch = {"unit_ids": teacher_units, "student_unit_ids": student_units, "labels": torch.tensor([0])}
    losses = method.loss(student_out, teacher_out, batch, nn.ModuleDict({"projection": projection}), "train")
    assert losses["hidden"].item() == pytest.approx(0.0, abs=1e-7)


def test_compression_report_counts_embedding_tables(teacher):
    student = get_method("dualtrain")({"vocab_size": STUDENT_VOCAB}).build_student(
        teacher, StudentShape(layers=2, hidden_size=8))
    report = compression_report(teacher, student)
    assert report["teacher_word_embedding_params"] == 21 * 16
    assert report["teacher_embedding_params"] == (21 + 64 + 2) * 16
    assert report["student_embedding_params"] == (STUDENT_VOCAB + 64 + 2) * 8
    assert report["student_params"] == sum(p.numel() for p in student.parameters())
    assert report["student_non_embedding_params"] == report["student_params"] - report["student_embedding_params"]
    assert report["params_ratio"] == pytest.approx(report["teacher_params"] / report["student_params"])


def test_distiller_step_with_a_frozen_teacher(teacher, tiny_tokenizer, student_tokenizer):
    method = get_method("dualtrain")({"vocab_size": STUDENT_VOCAB})
    student = method.build_student(teacher, StudentShape(layers=2, hidden_size=8))
    distiller = Distiller(method, student, teacher, TrainSettings(learning_rate=1e-2, warmup_ratio=0),
                          steps_per_epoch=3)
    projection = distiller.module.auxiliary["projection"].weight
    start = projection.detach().clone()
    batch = dual_batch(CORPUS[:4], tiny_tokenizer, student_tokenizer, 0.5, random.Random(0), STUDENT_VOCAB,
                       labels=[1, 0, 1, 0])
    assert (batch["student_input_ids"] >= STUDENT_VOCAB).any()  # the mixed embedding's teacher rows are read
    losses = [distiller.step(batch)["total"] for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not torch.equal(projection, start)
    # After training the student reads plain student-vocabulary ids.
    plain = student_tokenizer(CORPUS[:2], padding=True, return_tensors="pt")
    assert student.eval()(**plain).logits.shape == (2, 2)
