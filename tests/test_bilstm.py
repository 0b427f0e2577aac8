"""Tang et al.'s BiLSTM student, its word-level vocabulary and the "bilstm" method's loss."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from kd.models.bilstm import BiLSTMConfig, BiLSTMForSequenceClassification, build_vocab, embeddings_from_teacher
from kd.methods import get_method
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings

from conftest import tiny_bert_config

# [CLS] a b [SEP] c [SEP] [PAD] and [CLS] a [SEP] b c d [SEP]
PAIR_IDS = torch.tensor([[2, 5, 6, 3, 7, 3, 0], [2, 5, 3, 8, 9, 10, 3]])
PAIR_TYPES = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]])
PAIR_MASK = (PAIR_IDS != 0).long()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_bilstm(pair=False, **overrides) -> BiLSTMForSequenceClassification:
    torch.manual_seed(0)
    config = BiLSTMConfig(vocab_size=20, embedding_dim=6, hidden_size=5, mlp_hidden=7, num_labels=3, pair=pair, **overrides)
    return BiLSTMForSequenceClassification(config).eval()


def test_single_sentence_shapes():
    model = tiny_bilstm()
    out = model(input_ids=PAIR_IDS, attention_mask=PAIR_MASK, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 3)
    assert [h.shape for h in out.hidden_states] == [(2, 7, 10)]
    assert out.attentions is None


def test_pair_from_token_types_equals_explicit_second_input():
    model = tiny_bilstm(pair=True)
    assert model.mlp[0].in_features == 4 * 2 * 5  # [h1, h2, h1∘h2, |h1 − h2|]
    joint = model(input_ids=PAIR_IDS, attention_mask=PAIR_MASK, token_type_ids=PAIR_TYPES, output_hidden_states=True)
    first = torch.tensor([[2, 5, 6, 3], [2, 5, 3, 0]])
    second = torch.tensor([[7, 3, 0, 0], [8, 9, 10, 3]])
    explicit = model(input_ids=first, attention_mask=(first != 0).long(), input_ids_b=second,
                     attention_mask_b=(second != 0).long())
    assert joint.logits.shape == (2, 3) and len(joint.hidden_states) == 2
    assert torch.allclose(joint.logits, explicit.logits, atol=1e-6)


def test_pair_model_needs_the_second_segment():
    with pytest.raises(ValueError, match="token_type_ids or input_ids_b"):
        tiny_bilstm(pair=True)(input_ids=PAIR_IDS)


def test_padding_does_not_change_the_pooled_output():
    model = tiny_bilstm()
    ids = torch.tensor([[2, 5, 6, 3]])
    padded = torch.tensor([[2, 5, 6, 3, 0, 0, 0]])
    left_padded = torch.tensor([[0, 0, 2, 5, 6, 3]])
    _, pooled = model.encode(ids, torch.ones_like(ids, dtype=torch.bool))
    _, pooled_right = model.encode(padded, padded != 0)
    _, pooled_left = model.encode(left_padded, left_padded != 0)
    assert torch.allclose(pooled, pooled_right, atol=1e-6) and torch.allclose(pooled, pooled_left, atol=1e-6)
    assert torch.allclose(model(ids).logits, model(padded, attention_mask=(padded != 0).long()).logits, atol=1e-6)


def test_save_and_load_with_the_auto_class(tmp_path):
    model = tiny_bilstm(pair=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BiLSTMForSequenceClassification) and loaded.config.pair
    inputs = dict(input_ids=PAIR_IDS, attention_mask=PAIR_MASK, token_type_ids=PAIR_TYPES)
    assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_embeddings_are_copied_from_the_teacher():
    teacher = BertModel(tiny_bert_config())
    student = BiLSTMForSequenceClassification(BiLSTMConfig(vocab_size=teacher.config.vocab_size, embedding_dim=16))
    embeddings_from_teacher(student, teacher)
    assert torch.equal(student.embeddings.weight, teacher.embeddings.word_embeddings.weight)
    narrow = BiLSTMForSequenceClassification(BiLSTMConfig(vocab_size=teacher.config.vocab_size, embedding_dim=8))
    with pytest.raises(ValueError, match="must equal the teacher's embedding width"):
        embeddings_from_teacher(narrow, teacher)


def test_word_level_vocabulary(tmp_path):
    tokenizer = build_vocab(["Good movie.", "bad movie!", "good plot"], min_freq=2)
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert set(tokenizer.get_vocab()) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "movie"}
    assert len(build_vocab(["a b c d e f", "a b"], max_size=7)) == 7
    encoded = tokenizer("good plot", "movie [MASK]")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == [
        "[CLS]", "good", "[UNK]", "[SEP]", "movie", "[MASK]", "[SEP]"]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("good plot", "movie [MASK]")["input_ids"] == encoded["input_ids"]


def test_method_builds_the_student_from_the_teacher(tiny_teacher):
    method = get_method("bilstm")({"pair": True})
    student = method.build_student(tiny_teacher, StudentShape(layers=1))
    assert student.config.hidden_size == 300 and student.config.embedding_dim == 16 and student.config.pair
    assert torch.equal(student.embeddings.weight, tiny_teacher.bert.embeddings.word_embeddings.weight)
    random_init = get_method("bilstm")({"embeddings": "random", "embedding_dim": 12})
    student = random_init.build_student(tiny_teacher, StudentShape(layers=2, hidden_size=8))
    assert (student.config.embedding_dim, student.config.hidden_size, student.config.num_layers) == (12, 8, 2)


def test_loss_is_logit_mse_plus_weighted_cross_entropy():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, -1.0], [0.5, 1.0]])
    labels = torch.tensor([0, 1])
    mse = ((1 + 1) + (0.25 + 1)) / 2  # Σ_c (z_s − z_t)², batch mean
    ce = (-math.log(math.e / (math.e + 1)) - math.log(math.e**2 / (1 + math.e**2))) / 2
    out = type("Out", (), {"logits": student})
    teacher_out = type("Teacher", (), {"logits": teacher})

    pure = get_method("bilstm")().loss(out, teacher_out, {}, None, "train")  # α = 1 reads no labels
    assert set(pure) == {"mse", "total"} and pure["total"].item() == pytest.approx(mse)
    mixed = get_method("bilstm")({"alpha": 0.25}).loss(out, teacher_out, {"labels": labels}, None, "train")
    assert mixed["total"].item() == pytest.approx(0.25 * mse + 0.75 * ce)
    gold_only = get_method("bilstm")({"alpha": 0.0}).loss(out, teacher_out, {"labels": labels}, None, "train")
    assert gold_only["total"].item() == pytest.approx(ce)


def test_a_bilstm_on_gold_labels_alone_is_the_baseline_of_its_family():
    assert get_method("bilstm")({"alpha": 0.0}).is_baseline()
    assert not get_method("bilstm")({"alpha": 0.5}).is_baseline() and not get_method("bilstm")().is_baseline()
    assert get_method("finetune")().is_baseline() and not get_method("kd")().is_baseline()
    assert get_method("bilstm").family != get_method("finetune").family


def test_distiller_trains_the_bilstm(tiny_teacher):
    torch.manual_seed(0)
    method = get_method("bilstm")()
    student = method.build_student(tiny_teacher, StudentShape(layers=1, hidden_size=8))
    batch = {"input_ids": PAIR_IDS, "attention_mask": PAIR_MASK, "token_type_ids": PAIR_TYPES,
             "teacher_logits": torch.tensor([[2.0, -2.0], [-2.0, 2.0]])}
    distiller = Distiller(method, student, None, TrainSettings(learning_rate=1e-2, warmup_ratio=0), steps_per_epoch=20)
    losses = [distiller.step(batch)["total"] for _ in range(20)]
    assert losses[-1] < losses[0] / 2
