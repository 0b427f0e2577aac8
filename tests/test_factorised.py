"""The BERT with factorised (ALBERT-style) embeddings: widths, outputs, the tied E-wide MLM decoder, save/load
through the Auto classes, its parameter count, and the student ``StudentShape.embedding_size`` builds."""

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

from kd.models.factorised import (
    FactorisedBertConfig,
    FactorisedBertForMaskedLM,
    FactorisedBertForSequenceClassification,
    FactorisedBertModel,
)
from kd.students import StudentShape, build_student, count_parameters, parameter_counts, student_config

from conftest import toy_batch

VOCAB, HIDDEN, EMBED = 40, 16, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, num_labels=3)


def tiny_config(**overrides) -> FactorisedBertConfig:
    return FactorisedBertConfig(**{**TINY, "embedding_size": EMBED, **overrides})


def inputs() -> dict[str, torch.Tensor]:
    batch = toy_batch(labels=False)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def classifier(**overrides) -> FactorisedBertForSequenceClassification:
    torch.manual_seed(0)
    return FactorisedBertForSequenceClassification(tiny_config(**overrides)).eval()


def masked_lm(**overrides) -> FactorisedBertForMaskedLM:
    torch.manual_seed(0)
    model = FactorisedBertForMaskedLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # a bias other than its zero start, so the round trip checks it too
        model.cls.predictions.bias.normal_()
    return model


def test_embedding_tables_are_e_wide_and_lifted_to_h():
    model = classifier()
    embeddings = model.bert.embeddings
    assert model.get_input_embeddings() is embeddings.word_embeddings
    assert embeddings.word_embeddings.weight.shape == (VOCAB, EMBED)
    assert embeddings.position_embeddings.weight.shape == (64, EMBED)
    assert embeddings.token_type_embeddings.weight.shape == (2, EMBED)
    assert embeddings.LayerNorm.normalized_shape == (EMBED,)
    assert (embeddings.projection.in_features, embeddings.projection.out_features) == (EMBED, HIDDEN)
    # The standard BERT initialisation reached the new modules: N(0, 0.02) weights, zero biases, unit LayerNorm.
    assert 0.01 < embeddings.projection.weight.std() < 0.03 and not embeddings.projection.bias.any()
    assert torch.equal(embeddings.LayerNorm.weight, torch.ones(EMBED)) and not embeddings.LayerNorm.bias.any()
    assert not embeddings.word_embeddings.weight[0].any()  # the padding row
    assert torch.equal(embeddings.position_ids[0], torch.arange(64))


def test_the_model_is_bert_but_for_the_embeddings():
    """The __init__s are written out (BERT's would build an H-wide table first): the same modules as BertModel's."""
    plain = {name for name, _ in BertModel(BertConfig(**TINY)).named_parameters()}
    factorised = {name for name, _ in FactorisedBertModel(tiny_config()).named_parameters()}
    assert factorised - plain == {"embeddings.projection.weight", "embeddings.projection.bias"}
    assert plain <= factorised
    assert isinstance(classifier(), BertForSequenceClassification)


def test_classifier_outputs_hidden_states_at_h_and_eager_attentions():
    model = classifier()
    model.set_attn_implementation("eager")
    out = model(**inputs(), output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (4, 3)
    assert [h.shape for h in out.hidden_states] == [(4, 5, HIDDEN)] * 3  # the lifted embeddings, then 2 blocks
    lifted = model.bert.embeddings(input_ids=inputs()["input_ids"], token_type_ids=inputs()["token_type_ids"])
    torch.testing.assert_close(out.hidden_states[0], lifted)
    assert [a.shape for a in out.attentions] == [(4, 2, 5, 5)] * 2
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(4, 2, 5))  # eager: probabilities


def test_inputs_embeds_are_rows_of_the_e_wide_table():
    model = classifier()
    ids = inputs()
    embeds = model.get_input_embeddings()(ids.pop("input_ids"))
    assert embeds.shape == (4, 5, EMBED)
    torch.testing.assert_close(model(inputs_embeds=embeds, **ids).logits, model(**inputs()).logits)


def test_masked_lm_ends_in_the_tied_e_wide_space():
    model = masked_lm()
    predictions = model.cls.predictions
    assert (predictions.transform.dense.in_features, predictions.transform.dense.out_features) == (HIDDEN, EMBED)
    assert predictions.transform.LayerNorm.normalized_shape == (EMBED,)
    assert predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias
    assert model.get_output_embeddings() is predictions.decoder
    model.set_attn_implementation("eager")
    out = model(**inputs(), output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (4, 5, VOCAB)
    assert [h.shape for h in out.hidden_states] == [(4, 5, HIDDEN)] * 3
    assert len(out.attentions) == 2
    labels = torch.full((4, 5), -100)
    labels[:, 1] = 7
    assert model(**inputs(), labels=labels).loss > 0


def test_resizing_the_vocabulary_keeps_the_width_and_the_tie():
    model = masked_lm()
    model.resize_token_embeddings(VOCAB + 3)
    assert model.get_input_embeddings().weight.shape == (VOCAB + 3, EMBED)
    assert model.cls.predictions.decoder.weight is model.get_input_embeddings().weight
    assert model(**inputs()).logits.shape == (4, 5, VOCAB + 3)


def test_embedding_size_is_validated():
    with pytest.raises(Exception, match="embedding_size must be at least 1"):
        tiny_config(embedding_size=0)


@pytest.mark.parametrize("build, auto_class", [(classifier, AutoModelForSequenceClassification),
                                               (masked_lm, AutoModelForMaskedLM)])
def test_save_and_load_through_the_auto_classes(tmp_path, build, auto_class):
    model = build()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "kd-factorised-bert"
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.embedding_size == EMBED
    assert torch.equal(loaded(**inputs()).logits, model(**inputs()).logits)
    if isinstance(loaded, FactorisedBertForMaskedLM):
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is FactorisedBertModel
    assert torch.equal(encoder(**inputs()).last_hidden_state, model.bert(**inputs()).last_hidden_state)


def test_the_factorised_embedding_cuts_a_small_berts_size():
    """vocab 30522, H 256, E 128, 4 layers, 4 heads, FFN 1024, 512 positions, 2 token types, 2 labels; counted by hand:

    factorised embeddings: V·E 3,906,816 + pos·E 65,536 + type·E 256 + LN(E) 256 + lift E·H + H 33,024 = 4,005,888
      (the tables, 3,972,608, are what parameter_counts calls embeddings)
    plain embeddings:      V·H 7,813,632 + pos·H 131,072 + type·H 512 + LN(H) 512                  = 7,945,728
      (tables 7,945,216)
    one block: Q, K, V, O 4·(H·H + H) 263,168 + LN 512 + FFN H·I + I + I·H + H 525,568 + LN 512     =   789,760
    4 blocks 3,159,040; pooler H·H + H 65,792; classifier 2·H + 2 514
    factorised 4,005,888 + 3,159,040 + 65,792 + 514 = 7,231,234;  plain 7,945,728 + 3,225,346 = 11,171,074
    masked LM: 4,005,888 + 3,159,040 + head dense H·E + E 32,896 + LN(E) 256 + bias V 30,522 (decoder tied) = 7,228,602
    """
    settings = dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=1024, num_labels=2)
    with torch.device("meta"):
        factorised = FactorisedBertForSequenceClassification(FactorisedBertConfig(**settings, embedding_size=128))
        plain = BertForSequenceClassification(BertConfig(**settings))
        mlm = FactorisedBertForMaskedLM(FactorisedBertConfig(**settings, embedding_size=128))
    assert parameter_counts(factorised) == {"params": 7_231_234, "embedding_params": 3_972_608,
                                            "word_embedding_params": 3_906_816,
                                            "non_embedding_params": 7_231_234 - 3_972_608}
    assert parameter_counts(plain) == {"params": 11_171_074, "embedding_params": 7_945_216,
                                       "word_embedding_params": 7_813_632,
                                       "non_embedding_params": 11_171_074 - 7_945_216}
    assert count_parameters(mlm) == 7_228_602


def test_shape_with_embedding_size_builds_a_factorised_student_that_trains(tiny_teacher):
    student = build_student(tiny_teacher, StudentShape(layers=2, hidden_size=16, embedding_size=8, init="random"))
    assert type(student) is FactorisedBertForSequenceClassification
    assert (student.config.embedding_size, student.config.hidden_size, student.config.num_hidden_layers) == (8, 16, 2)
    assert student.config.num_labels == tiny_teacher.config.num_labels
    assert student.get_input_embeddings().weight.shape == (tiny_teacher.config.vocab_size, 8)
    batch = toy_batch()
    student.train()
    loss = student(**batch).loss
    loss.backward()
    silent = [name for name, p in student.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []
    # At a random start every row's logits are nearly the same (loss ≈ ln 2) and single steps do not lower the loss
    # reliably; a few Adam steps on the dropout-free loss fit the four rows.
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student.eval()
    with torch.no_grad():
        start = student(**batch).loss
    for _ in range(15):
        optimizer.zero_grad()
        student(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert student(**batch).loss < start / 2


def test_a_factorised_student_of_the_teachers_width_copies_its_blocks_not_its_embeddings(tiny_teacher):
    student = build_student(tiny_teacher, StudentShape(layers=2, embedding_size=8, init=[2, 4]))
    assert type(student) is FactorisedBertForSequenceClassification
    for student_index, teacher_layer in enumerate([2, 4]):
        got = student.bert.encoder.layer[student_index].state_dict()
        want = tiny_teacher.bert.encoder.layer[teacher_layer - 1].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(student.bert.pooler.dense.weight, tiny_teacher.bert.pooler.dense.weight)
    assert torch.equal(student.classifier.weight, tiny_teacher.classifier.weight)
    assert student.get_input_embeddings().weight.shape == (tiny_teacher.config.vocab_size, 8)


def test_an_embedding_size_equal_to_the_hidden_size_is_a_plain_bert(tiny_teacher):
    config = student_config(tiny_teacher.config, StudentShape(layers=2, embedding_size=16))
    assert type(config) is BertConfig and config.model_type == "bert"
    student = build_student(tiny_teacher, StudentShape(layers=2, embedding_size=16, init=[1, 2]))
    assert type(student) is BertForSequenceClassification
    assert torch.equal(student.get_input_embeddings().weight, tiny_teacher.get_input_embeddings().weight)
    factorised = student_config(tiny_teacher.config, StudentShape(layers=2, hidden_size=32, embedding_size=8))
    assert type(factorised) is FactorisedBertConfig and factorised.model_type == "kd-factorised-bert"
    assert factorised.to_dict()["model_type"] == "kd-factorised-bert"
    assert (factorised.hidden_size, factorised.intermediate_size, factorised.embedding_size) == (32, 128, 8)


def test_a_saved_factorised_student_is_counted_by_the_summary(tiny_teacher, tmp_path):
    from pipeline.summary import parameter_breakdown

    student = build_student(tiny_teacher, StudentShape(layers=2, embedding_size=8, init="random"))
    student.save_pretrained(tmp_path)
    breakdown = parameter_breakdown(tmp_path)
    counts = parameter_counts(student)
    assert {key: breakdown[key] for key in counts} == counts
    assert (breakdown["vocab_size"], breakdown["hidden_size"]) == (tiny_teacher.config.vocab_size, 16)
    assert breakdown.get("embedding_size", 8) == 8  # where the breakdown reports the width of the tables
    tables = tiny_teacher.config.vocab_size * 8 + 64 * 8 + 2 * 8  # word, position, token type at E = 8
    assert breakdown["embedding_params"] == tables
    assert breakdown["word_embedding_params"] == tiny_teacher.config.vocab_size * 8


def test_the_distillation_attention_implementation_applies(tiny_teacher):
    """The worker switches a student to kd.attention's implementation for attention losses: BERT's blocks take it."""
    from kd.attention import SCORES_ATTENTION

    student = build_student(tiny_teacher, StudentShape(layers=2, embedding_size=8, init="random")).eval()
    student.set_attn_implementation(SCORES_ATTENTION)
    scores = student(**inputs(), output_attentions=True).attentions
    assert [a.shape for a in scores] == [(4, 2, 5, 5)] * 2
    assert not torch.allclose(scores[0].softmax(-1), scores[0])  # the scaled scores, not probabilities
