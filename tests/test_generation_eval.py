"""Evaluating a seq2seq student: sacreBLEU and ROUGE-L, Koehn's paired bootstrap, decoding in input order, greedy
latency, and the evaluation stage's inner function (without Ray) and ``run`` through the shared local Ray. Tiny
random BART students over conftest's 16-word vocabulary."""

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from transformers import BertForSequenceClassification

from kd.cmlm import student_batch
from kd.generation import (bleu_from_statistics, encode_sources, generate, generation_latencies, generation_latency,
                           paired_bootstrap, round_trip, sentence_statistics, text_scores)
from kd.layout import STUDENT_DIR
from kd.models.seq2seq import Seq2SeqShape, build_seq2seq_student
from stages import evaluate_generation
from stages.evaluate_generation import TEST_BEAM, TEST_GREEDY

from conftest import tiny_bert_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = Seq2SeqShape(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32)
# Sources of different lengths, not in length order.
SOURCES = ["the movie is not very good", "dull", "a great plot", "the actor was bad", "fun", "a film is a film"]

REFERENCES = ["the cat sat on the mat .", "a quick brown fox jumps over the lazy dog", "hello world",
              "it was a good film , not a great one", "the plot was dull and the actors were bad"]


# --- scores ---------------------------------------------------------------------------------------------------


def test_identical_output_scores_full_marks():
    scores = text_scores(REFERENCES, REFERENCES)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rougeL"] == pytest.approx(1.0)
    assert scores["sentence_bleu"] == pytest.approx([100.0] * len(REFERENCES))
    assert scores["sentence_rougeL"] == pytest.approx([1.0] * len(REFERENCES))


def test_scores_match_the_libraries_called_directly():
    hypotheses = ["the cat sat on a mat", "a quick fox jumped over the dog", "hello there world",
                  "it was a fine film", ""]
    scores = text_scores(hypotheses, REFERENCES)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [REFERENCES]).score)
    assert scores["sentence_bleu"] == pytest.approx(
        [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hypotheses, REFERENCES)])
    assert scores["sentence_bleu"][-1] == 0.0  # an empty hypothesis
    # "the cat sat on a mat" against "the cat sat on the mat ." (rouge-score drops the '.'): LCS "the cat sat on
    # mat" = 5 of 6 tokens either way, so F1 = 5/6.
    assert scores["sentence_rougeL"][0] == pytest.approx(5 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, REFERENCES)]
    assert scores["sentence_rougeL"] == pytest.approx(expected)
    assert scores["rougeL"] == pytest.approx(np.mean(expected))


def test_a_known_pair_scores_what_sacrebleu_gives():
    # 7 hypothesis tokens, 6 reference tokens: matches 5/7, 3/6, 1/5, 0/4 n-grams; the 4-gram precision is
    # smoothed (exp: 1 / (2 · 4)); no brevity penalty. BLEU = exp(mean log p) · 100.
    hypothesis, reference = "the cat sat on the mat today", "the cat is on the mat"
    expected = 100 * np.exp(np.mean(np.log([5 / 7, 3 / 6, 1 / 5, 1 / 8])))
    assert text_scores([hypothesis], [reference])["bleu"] == pytest.approx(expected)
    assert sacrebleu.corpus_bleu([hypothesis], [[reference]]).score == pytest.approx(expected)


def test_lowercase_scores_an_uncased_student_fairly():
    hypotheses, references = ["the cat sat on the mat"], ["The Cat sat on the Mat"]
    assert text_scores(hypotheses, references)["bleu"] < 100
    assert text_scores(hypotheses, references, lowercase=True)["bleu"] == pytest.approx(100.0)


def test_corpus_bleu_from_summed_sentence_statistics():
    hypotheses = ["the cat sat on a mat", "a quick fox jumped over the dog", "hello there world",
                  "it was a fine film", ""]
    _, stats = sentence_statistics(hypotheses, REFERENCES)
    assert stats.shape == (5, 10)
    assert bleu_from_statistics(stats.sum(0)) == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [REFERENCES]).score)
    subset = [0, 0, 3, 4]
    assert bleu_from_statistics(stats[subset].sum(0)) == pytest.approx(
        sacrebleu.corpus_bleu([hypotheses[i] for i in subset], [[REFERENCES[i] for i in subset]]).score)


def test_mismatched_or_empty_input_is_refused():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        text_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no sentences"):
        text_scores([], [])


# --- the paired bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_finds_a_perfect_system_better():
    worse = ["nothing"] * len(REFERENCES)
    result = paired_bootstrap(REFERENCES, worse, REFERENCES, samples=200, seed=1)
    assert result["bleu_a"] == pytest.approx(100.0) and result["bleu_b"] == 0.0
    assert result["difference"] == pytest.approx(100.0)
    assert result["a_wins"] == 1.0 and result["b_wins"] == 0.0
    assert result["p_value"] == pytest.approx(2 / 201)
    assert result["ci95"][0] > 0

    reverse = paired_bootstrap(worse, REFERENCES, REFERENCES, samples=200, seed=1)
    assert reverse["difference"] == pytest.approx(-100.0) and reverse["a_wins"] == 0.0
    assert reverse["p_value"] == pytest.approx(result["p_value"])


def test_bootstrap_of_a_system_against_itself_finds_nothing():
    system = ["the cat sat on a mat", "a quick fox", "hello there world", "it was a fine film", "dull"]
    result = paired_bootstrap(system, list(system), REFERENCES, samples=100)
    assert result["difference"] == 0.0
    assert result["a_wins"] == 0.0 and result["b_wins"] == 0.0
    assert result["p_value"] == 1.0


def test_bootstrap_is_deterministic_with_its_seed():
    a = ["the cat sat on a mat", "a quick fox jumped over the dog", "hello there world", "it was a fine film", "x"]
    b = ["the cat is on the mat", "a brown fox", "hello world", "a good film", "the plot was dull"]
    first, again = (paired_bootstrap(a, b, REFERENCES, samples=300, seed=7) for _ in range(2))
    assert first == again
    assert 0.0 < first["a_wins"] < 1.0  # close systems on 5 sentences: the draws disagree
    other = paired_bootstrap(a, b, REFERENCES, samples=300, seed=8)
    assert other["difference"] == first["difference"]
    assert other["a_wins"] != first["a_wins"] or other["ci95"] != first["ci95"]


# --- decoding ---------------------------------------------------------------------------------------------------


class EchoModel:
    """A stand-in for a seq2seq model whose output is its input: decoding it must give back each source."""

    device = torch.device("cpu")

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, **settings):
        self.batches.append(input_ids)
        return input_ids


def test_generate_restores_the_input_order(tiny_tokenizer):
    # Sorted by length for batching, the sources come back in their own order, each decoded from its own ids.
    model = EchoModel()
    outputs = generate(model, tiny_tokenizer, SOURCES, max_source_length=16, batch_size=4)
    assert outputs == SOURCES
    assert [len(batch) for batch in model.batches] == [4, 2]
    assert model.batches[0].shape[1] == 6  # [CLS] + 4 words + [SEP]: the short batch pads to its own longest
    assert outputs == generate(EchoModel(), tiny_tokenizer, SOURCES, max_source_length=16, batch_size=1)


def test_sources_are_encoded_as_the_student_was_trained(tiny_tokenizer):
    encoded = encode_sources(tiny_tokenizer, SOURCES, 3)
    trained = student_batch(tiny_tokenizer, SOURCES, ["good"] * len(SOURCES), 3, 8)
    assert torch.equal(encoded["input_ids"], trained["input_ids"])
    assert torch.equal(encoded["attention_mask"], trained["attention_mask"])
    cut = generate(EchoModel(), tiny_tokenizer, SOURCES, max_source_length=3)
    assert cut[0] == "the movie is"


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    """A tiny random student; weights wider than BERT's 0.02 make its outputs depend on the source and keep its
    argmaxes clear of near-ties (so batching cannot flip them)."""
    torch.manual_seed(0)
    model = build_seq2seq_student(BertForSequenceClassification(tiny_bert_config()), tiny_tokenizer, SHAPE)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_gives_one_string_per_source_whatever_the_batching(student, tiny_tokenizer, num_beams):
    tokenizer = tiny_tokenizer
    outputs = generate(student, tokenizer, SOURCES, max_source_length=16, max_new_tokens=6, num_beams=num_beams,
                       batch_size=4)
    assert len(outputs) == len(SOURCES) and all(isinstance(text, str) for text in outputs)
    assert all(len(text.split()) <= 6 for text in outputs)
    alone = [generate(student, tokenizer, [source], max_source_length=16, max_new_tokens=6, num_beams=num_beams)[0]
             for source in SOURCES]
    assert outputs == alone  # each source's output is its own, in its place
    if num_beams == 1:
        assert len(set(outputs)) > 1  # the outputs differ, so a mixed-up order would show


def test_generation_latency_reports_a_batch(student, tiny_tokenizer):
    latency = generation_latency(student, tiny_tokenizer, SOURCES * 6, batch_size=32, max_new_tokens=4, warmup=1,
                                 repeats=2, threads=1)
    assert latency["batch_size"] == 32
    assert 1 <= latency["new_tokens"] <= 4
    assert latency["ms_per_batch"] > 0
    assert latency["sentences_per_second"] == pytest.approx(32 / (latency["ms_per_batch"] / 1000))


def test_students_timed_together_get_a_speed_each_from_interleaved_runs(student, tiny_tokenizer, monkeypatch):
    calls = []
    original = type(student).generate

    def recorded(model, *args, **kwargs):
        calls.append(model.tag)
        return original(model, *args, **kwargs)

    other = copy.deepcopy(student)
    student.tag, other.tag = "a", "b"
    monkeypatch.setattr(type(student), "generate", recorded)
    speeds = generation_latencies([student, other], [tiny_tokenizer] * 2, SOURCES, batch_size=4, max_new_tokens=3,
                                  warmup=1, repeats=2, threads=1)
    assert calls == ["a", "b"] * 3  # in turn within every repeat, not one model's runs back to back
    assert [speed["batch_size"] for speed in speeds] == [4, 4] and all(s["ms_per_batch"] > 0 for s in speeds)


def test_round_trip_is_what_a_perfect_student_writes(tiny_tokenizer):
    # Lowercased, the out-of-vocabulary ',' dropped (it is [UNK], a special token), cut to 4 word pieces.
    assert round_trip(tiny_tokenizer, ["The MOVIE is , good", "a film was very fun"], max_tokens=4) == [
        "the movie is", "a film was very"]


# --- the stage --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_student(student, tiny_tokenizer, tmp_path):
    """A model artifact as a training stage leaves one: ``student/`` with the model and its tokenizer."""
    folder = tmp_path / "model" / STUDENT_DIR
    student.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder.parent


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, rows in (("dev", SOURCES[:3]), ("test", SOURCES)):
        frame = pd.DataFrame({"source": rows, "target": [f"the {text}" for text in rows]}, dtype="string")
        frame.to_parquet(folder / f"{split}.parquet", index=False)
    return folder


SETTINGS = dict(num_beams=2, max_new_tokens=8, max_source_length=16, batch_size=4, latency_batch_size=4,
                latency_repeats=1, threads=1)


def check_result(result: dict, out, student, tokenizer) -> None:
    split_keys = {"bleu", "rougeL", "bleu_greedy", "rougeL_greedy", "bleu_ceiling", "rougeL_ceiling", "sentences"}
    assert set(result["dev"]) == set(result["test"]) == split_keys
    assert result["dev"]["sentences"] == 3 and result["test"]["sentences"] == len(SOURCES)
    for scores in (result["dev"], result["test"]):
        assert 0 <= scores["bleu"] <= 100 and 0 <= scores["rougeL"] <= 1
        assert scores["bleu_ceiling"] == pytest.approx(100.0)  # every target is in the vocabulary, lowercase, under 8 pieces
    assert result["params"] == sum(p.numel() for p in student.parameters())
    assert result["size_bytes"] > 0
    assert set(result["latency"]) == {"sentences_per_second", "ms_per_batch", "batch_size", "new_tokens"}
    assert result["latency"]["batch_size"] == 4 and result["lowercase"] is True

    greedy = (out / TEST_GREEDY).read_text(encoding="utf-8").split("\n")
    beam = (out / TEST_BEAM).read_text(encoding="utf-8").split("\n")
    assert len(greedy) == len(beam) == len(SOURCES) + 1 and greedy[-1] == beam[-1] == ""
    assert greedy[:-1] == generate(student, tokenizer, SOURCES, max_source_length=16, max_new_tokens=8)
    assert beam[:-1] == generate(student, tokenizer, SOURCES, max_source_length=16, max_new_tokens=8, num_beams=2)
    references = [f"the {text}" for text in SOURCES]
    expected = text_scores(beam[:-1], references, lowercase=True)
    assert result["test"]["bleu"] == pytest.approx(expected["bleu"])
    assert result["test"]["rougeL_greedy"] == pytest.approx(text_scores(greedy[:-1], references)["rougeL"])


def test_stage_inner_function_writes_hypotheses_and_scores(saved_student, data_dir, tmp_path, student, tiny_tokenizer,
                                                             capsys):
    out = tmp_path / "out"
    out.mkdir()
    settings = evaluate_generation.Config(**SETTINGS).model_dump()
    result = evaluate_generation.evaluate_generation(str(saved_student / STUDENT_DIR), str(data_dir), str(out),
                                                     settings)
    check_result(result, out, student, tiny_tokenizer)
    printed = capsys.readouterr().out
    assert "[evaluate_generation] dev: 3 sentences" in printed and "[evaluate_generation] test:" in printed


def test_stage_config_defaults_and_key():
    cfg = evaluate_generation.Config()
    assert (cfg.num_beams, cfg.max_new_tokens, cfg.max_source_length, cfg.batch_size) == (4, 64, 64, 32)
    # The batching and threads change how fast, not what, the stage writes; the decoding is keyed.
    assert cfg.key_values() == evaluate_generation.Config(batch_size=8, threads=2).key_values()
    assert cfg.key_values() != evaluate_generation.Config(num_beams=1).key_values()


@pytest.mark.ray
def test_stage_runs_through_ray(ray_session, saved_student, data_dir, tmp_path, student, tiny_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    inputs = {"model": SimpleNamespace(path=saved_student), "data": SimpleNamespace(path=data_dir)}
    result = evaluate_generation.run(evaluate_generation.Config(**SETTINGS), inputs, None, out)
    check_result(result, out, student, tiny_tokenizer)
