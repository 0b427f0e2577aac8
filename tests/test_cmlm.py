"""C-MLM distillation for text generation: the teacher's target-only masking and soft targets, the student's
loss, and the BART student built over the teacher's vocabulary."""

import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, BertForMaskedLM

from kd.cmlm import (
    cmlm_loss,
    encode_pairs,
    mask_targets,
    masked_target_accuracy,
    masking_rounds,
    soft_targets,
    student_batch,
)
from kd.models.seq2seq import Seq2SeqShape, build_seq2seq_student

from conftest import tiny_bert_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCES = ["the movie is good", "a film", "the plot was not very fun", "dull"]
TARGETS = ["a great film", "the actor is bad", "good", ""]  # the last pair has no target token

# One sequence of two label positions over a 4-token vocabulary, k = 2.
#   position 0: z = (0, 0, 0, 0)      → q = (¼, ¼, ¼, ¼);           label 1
#   position 1: z = (ln 3, 0, 0, 0)   → q = (3, 1, 1, 1) / 6;       label 0
LOGITS = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[1, 0]])
TOPK_IDS = torch.tensor([[[1, 2], [0, 3]]], dtype=torch.int32)
# Position 0's stored mass sums to 0.8 (the rest of the vocabulary was cut): renormalised it is (0.75, 0.25).
TOPK_PROBS = torch.tensor([[[0.6, 0.2], [0.5, 0.5]]])


def test_loss_matches_hand_computed_values():
    # T = 1.
    #   kd₀ = −(0.75 · ln ¼ + 0.25 · ln ¼) = ln 4
    #   kd₁ = −(0.5 · ln ½ + 0.5 · ln ⅙)   = ½ ln 12
    #   kd  = (ln 4 + ½ ln 12) / 2                      ≈ 1.314374
    #   nll = (−ln ¼ − ln ½) / 2 = (ln 4 + ln 2) / 2     ≈ 1.039721
    #   total (α = 0.25) = 0.25 · kd + 0.75 · nll
    kd = (math.log(4) + 0.5 * math.log(12)) / 2
    nll = (math.log(4) + math.log(2)) / 2
    loss = cmlm_loss(LOGITS, LABELS, TOPK_IDS, TOPK_PROBS, alpha=0.25, temperature=1.0)
    assert loss["kd"].item() == pytest.approx(kd, abs=1e-6)
    assert loss["nll"].item() == pytest.approx(nll, abs=1e-6)
    assert loss["total"].item() == pytest.approx(0.25 * kd + 0.75 * nll, abs=1e-6)

    # T = 2: position 0 stays uniform; position 1's z / 2 = (½ ln 3, 0, 0, 0) → q = (√3, 1, 1, 1) / (3 + √3).
    #   kd₁ = −(0.5 · (½ ln 3 − ln(3 + √3)) + 0.5 · (−ln(3 + √3))) = ln(3 + √3) − ¼ ln 3
    #   kd  = T² · (ln 4 + kd₁) / 2;  nll is read at T = 1 and does not change.
    kd_at_2 = 4 * (math.log(4) + math.log(3 + math.sqrt(3)) - 0.25 * math.log(3)) / 2
    loss = cmlm_loss(LOGITS, LABELS, TOPK_IDS, TOPK_PROBS, alpha=0.25, temperature=2.0)
    assert loss["kd"].item() == pytest.approx(kd_at_2, abs=1e-5)
    assert loss["nll"].item() == pytest.approx(nll, abs=1e-6)


def test_positions_without_a_reading_or_a_label_add_no_kd():
    untaught = TOPK_PROBS.clone()
    untaught[0, 1] = 0.0  # e.g. the final [SEP], which has no teacher reading
    loss = cmlm_loss(LOGITS, LABELS, TOPK_IDS, untaught, alpha=0.5)
    assert loss["kd"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert loss["nll"].item() == pytest.approx((math.log(4) + math.log(2)) / 2, abs=1e-6)

    padded = cmlm_loss(LOGITS, torch.tensor([[1, -100]]), TOPK_IDS, TOPK_PROBS, alpha=0.5)
    assert padded["kd"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert padded["nll"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_pairs_are_laid_out_as_two_segments_cut_separately(tiny_tokenizer):
    batch = encode_pairs(tiny_tokenizer, ["the movie is very good", "a"], ["great plot", "the film was fun"],
                         max_source_length=3, max_target_length=3)
    cls, sep, pad = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id, tiny_tokenizer.pad_token_id
    ids = tiny_tokenizer.convert_tokens_to_ids
    assert batch["input_ids"].tolist() == [
        [cls, *ids(["the", "movie", "is"]), sep, *ids(["great", "plot"]), sep],
        [cls, ids("a"), sep, *ids(["the", "film", "was"]), sep, pad],
    ]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0]]
    assert batch["target_mask"].long().tolist() == [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [8, 7]


def test_student_label_positions_are_the_teacher_target_tokens(tiny_tokenizer):
    pairs = encode_pairs(tiny_tokenizer, SOURCES, TARGETS, max_source_length=4, max_target_length=2)
    student = student_batch(tiny_tokenizer, SOURCES, TARGETS, max_source_length=4, max_target_length=2)
    for row in range(len(SOURCES)):
        target = pairs["input_ids"][row][pairs["target_mask"][row]].tolist()
        labels = [token for token in student["labels"][row].tolist() if token != -100]
        assert labels == [*target, tiny_tokenizer.sep_token_id]
        source_length = int(student["attention_mask"][row].sum())
        assert student["input_ids"][row, :source_length].tolist() == pairs["input_ids"][row, :source_length].tolist()


def test_only_target_tokens_are_masked_and_every_target_gets_one(tiny_tokenizer):
    batch = encode_pairs(tiny_tokenizer, SOURCES, TARGETS, max_source_length=8, max_target_length=8)
    target_mask = batch["target_mask"]
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        masked, labels = mask_targets(batch["input_ids"], target_mask, tiny_tokenizer, generator=generator)
        chosen = labels != -100
        assert not (chosen & ~target_mask).any()
        assert torch.equal(masked[~target_mask], batch["input_ids"][~target_mask])
        assert torch.equal(labels[chosen], batch["input_ids"][chosen])
        assert (chosen.sum(1) >= 1).tolist() == target_mask.any(1).tolist()


def test_chosen_tokens_follow_bert_80_10_10(tiny_tokenizer):
    input_ids = torch.randint(5, len(tiny_tokenizer), (40, 50), generator=torch.Generator().manual_seed(0))
    target_mask = torch.ones_like(input_ids, dtype=torch.bool)
    masked, labels = mask_targets(input_ids, target_mask, tiny_tokenizer, probability=0.5,
                                  generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    as_mask = masked == tiny_tokenizer.mask_token_id
    unchanged = masked == input_ids
    assert as_mask[chosen].float().mean().item() == pytest.approx(0.8, abs=0.04)
    # Random replacements may draw the token itself (1 in the 16 ordinary tokens), so slightly over 10% stay.
    assert unchanged[chosen].float().mean().item() == pytest.approx(0.1 + 0.1 / 16, abs=0.03)
    replaced = chosen & ~unchanged & ~as_mask
    assert replaced.any()
    assert not torch.isin(masked[replaced], torch.tensor(tiny_tokenizer.all_special_ids)).any()

    masked, labels = mask_targets(input_ids, target_mask, tiny_tokenizer, mask_only=True,
                                  generator=torch.Generator().manual_seed(1))
    assert (masked[labels != -100] == tiny_tokenizer.mask_token_id).all()


@pytest.mark.parametrize("rounds", [1, 2, 3, 7])
def test_masking_rounds_partition_the_target_tokens(tiny_tokenizer, rounds):
    target_mask = encode_pairs(tiny_tokenizer, SOURCES, TARGETS, 8, 8)["target_mask"]
    groups = masking_rounds(target_mask, rounds)
    assert groups.shape == (rounds, *target_mask.shape)
    assert torch.equal(groups.sum(0), target_mask.long())  # every target token in exactly one group, nothing else
    for row in range(target_mask.shape[0]):
        positions = target_mask[row].nonzero().flatten()
        for index, position in enumerate(positions.tolist()):
            assert groups[index % rounds, row, position]


@pytest.fixture(scope="module")
def cmlm_teacher() -> BertForMaskedLM:
    torch.manual_seed(0)
    # Weights wider than BERT's 0.02 give peaked distributions: near-uniform ones would leave top-k ids to ties.
    return BertForMaskedLM(tiny_bert_config(num_hidden_layers=2, initializer_range=0.5)).eval()


def test_soft_targets_give_one_distribution_per_target_token(cmlm_teacher, tiny_tokenizer):
    batch = encode_pairs(tiny_tokenizer, SOURCES, TARGETS, 8, 8)
    readings = soft_targets(cmlm_teacher, batch, rounds=2, k=4, temperature=2.0,
                            mask_token_id=tiny_tokenizer.mask_token_id)
    rows = batch["target_mask"].nonzero(as_tuple=True)[0]
    n = len(rows)
    assert readings["topk_ids"].shape == (n, 4) and readings["topk_ids"].dtype == torch.int32
    assert readings["topk_probs"].shape == (n, 4) and readings["topk_probs"].dtype == torch.float16
    assert torch.allclose(readings["topk_probs"].float().sum(-1), torch.ones(n), atol=2e-3)
    assert torch.equal(readings["row"], rows)
    expected_index = torch.cat([torch.arange(int(count)) for count in batch["target_mask"].sum(1)])
    assert torch.equal(readings["target_index"], expected_index)


def test_soft_targets_with_a_round_per_token_are_the_one_mask_at_a_time_reading(cmlm_teacher, tiny_tokenizer):
    batch = encode_pairs(tiny_tokenizer, SOURCES, TARGETS, 8, 8)
    k, temperature = 3, 1.5
    longest = int(batch["target_mask"].sum(1).max())
    readings = soft_targets(cmlm_teacher, batch, rounds=longest, k=k, temperature=temperature,
                            mask_token_id=tiny_tokenizer.mask_token_id)
    naive_ids, naive_probs = [], []
    with torch.no_grad():
        for row in range(len(SOURCES)):
            length = int(batch["attention_mask"][row].sum())
            inputs = {key: batch[key][row:row + 1, :length]
                      for key in ("input_ids", "attention_mask", "token_type_ids")}
            for position in batch["target_mask"][row].nonzero().flatten().tolist():
                masked = inputs["input_ids"].clone()
                masked[0, position] = tiny_tokenizer.mask_token_id
                logits = cmlm_teacher(**{**inputs, "input_ids": masked}).logits[0, position]
                probs, ids = torch.softmax(logits / temperature, -1).topk(k)
                naive_ids.append(ids)
                naive_probs.append(probs / probs.sum())
    assert torch.equal(readings["topk_ids"].long(), torch.stack(naive_ids))
    assert torch.allclose(readings["topk_probs"].float(), torch.stack(naive_probs), atol=1e-3)

    # One round masks the whole target at once: a different, coarser reading.
    approximate = soft_targets(cmlm_teacher, batch, rounds=1, k=k, temperature=temperature,
                               mask_token_id=tiny_tokenizer.mask_token_id)
    assert not torch.allclose(approximate["topk_probs"].float(), torch.stack(naive_probs), atol=1e-2)


def test_masked_target_accuracy_is_deterministic_given_a_seed(cmlm_teacher, tiny_tokenizer):
    scores = [masked_target_accuracy(cmlm_teacher, tiny_tokenizer, SOURCES, TARGETS, 8, 8, batch_size=2, seed=seed)
              for seed in (3, 3)]
    assert scores[0] == scores[1]
    assert scores[0]["masked_tokens"] >= 3  # at least one per pair with a target
    assert 0.0 <= scores[0]["accuracy"] <= 1.0


SHAPE = Seq2SeqShape(encoder_layers=2, decoder_layers=2, d_model=16, heads=2, ffn_dim=32)


@pytest.fixture
def student(tiny_teacher, tiny_tokenizer):
    torch.manual_seed(0)
    return build_seq2seq_student(tiny_teacher, tiny_tokenizer, SHAPE).eval()


def test_student_learns_from_labels_and_generates(student, tiny_tokenizer):
    batch = student_batch(tiny_tokenizer, SOURCES, TARGETS, 8, 8)
    output = student(**batch)
    assert torch.isfinite(output.loss)
    assert output.logits.shape == (*batch["labels"].shape, len(tiny_tokenizer))
    # Given only labels, BART shifts them right itself, after [CLS], with [PAD] for -100.
    decoder_input_ids = student.prepare_decoder_input_ids_from_labels(batch["labels"])
    assert (decoder_input_ids[:, 0] == tiny_tokenizer.cls_token_id).all()
    explicit = student(**batch, decoder_input_ids=decoder_input_ids)
    assert torch.allclose(explicit.loss, output.loss)

    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    for num_beams in (1, 2):
        generated = student.generate(**inputs, max_new_tokens=5, num_beams=num_beams, do_sample=False)
        assert generated.dtype == torch.long and generated.shape[0] == len(SOURCES)
        assert (generated[:, 0] == tiny_tokenizer.cls_token_id).all()
        assert generated.shape[1] <= 6


def test_teacher_init_copies_the_encoder(tiny_teacher, tiny_tokenizer):
    student = build_seq2seq_student(tiny_teacher, tiny_tokenizer, SHAPE.model_copy(update={"init": "teacher"})).eval()
    bert = tiny_teacher.bert
    encoder = student.model.encoder
    assert torch.equal(encoder.layers[1].self_attn.k_proj.weight, bert.encoder.layer[1].attention.self.key.weight)
    assert torch.equal(encoder.layers[0].fc2.bias, bert.encoder.layer[0].output.dense.bias)
    assert torch.equal(student.lm_head.weight, bert.embeddings.word_embeddings.weight)  # tied to the copy
    # Embeddings and blocks together: the encoder computes the teacher's second layer on a segment-A input.
    batch = student_batch(tiny_tokenizer, SOURCES[:1], TARGETS[:1], 8, 8)
    with torch.no_grad():
        ours = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        theirs = tiny_teacher.eval().bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          output_hidden_states=True).hidden_states[2]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_teacher_init_refuses_other_widths(tiny_teacher, tiny_tokenizer):
    narrow = SHAPE.model_copy(update={"init": "teacher", "d_model": 8, "heads": 2})
    with pytest.raises(ValueError, match="d_model 8"):
        build_seq2seq_student(tiny_teacher, tiny_tokenizer, narrow)


def test_student_round_trips_through_save_pretrained(student, tiny_tokenizer, tmp_path):
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    assert loaded.config.decoder_start_token_id == tiny_tokenizer.cls_token_id
    assert loaded.config.eos_token_id == tiny_tokenizer.sep_token_id
    batch = student_batch(tiny_tokenizer, SOURCES, TARGETS, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, student(**batch).logits)
