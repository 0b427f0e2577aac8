"""Evaluating a seq2seq student (``kd.models.seq2seq``): decoding, BLEU and ROUGE-L, Koehn's paired bootstrap,
and generation latency. Pure PyTorch and transformers; ``stages/evaluate_generation.py`` runs it inside Ray.

Decoding reads each source as the student was trained on it (``kd.cmlm.student_batch``: ``[CLS] source [SEP]``,
the source cut to ``max_source_length`` word pieces) and turns the generated ids back into text with the
tokenizer's own decoder: special tokens dropped, WordPiece's ``##`` joined, and its clean-up of the spaces before
punctuation (``clean_up_tokenization_spaces``). That round trip is lossy for a BERT vocabulary (an uncased one
lowercases and strips accents; "well-known" comes back as "well - known"), so even a student that reproduces the
reference's word pieces exactly does not score 100 against the raw reference: ``round_trip`` gives that perfect
output, whose score is the ceiling of every student on the same vocabulary.

Metrics come from maintained libraries, not from code here: corpus BLEU from sacreBLEU (its default 13a
tokenisation and exponential smoothing, lowercased when the vocabulary is uncased) and ROUGE-L F1 from Google's
``rouge-score`` (its own tokeniser, which lowercases and keeps only [a-z0-9] runs), averaged over sentences.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import sacrebleu
import torch
from sacrebleu.metrics import BLEU
from sacrebleu.metrics.bleu import MAX_NGRAM_ORDER
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd.cmlm import student_batch

# sacreBLEU's sufficient statistics of one sentence, as BLEUScore reports them:
# [hypothesis length, closest reference length, matches of 1..4-grams, hypothesis 1..4-grams].
NGRAM_ORDER = MAX_NGRAM_ORDER


def encode_sources(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                   max_source_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``[CLS] source [SEP]``, right-padded: exactly the student's encoder
    input in training (``kd.cmlm.student_batch``, whose labels are dropped)."""
    batch = student_batch(tokenizer, sources, [""] * len(sources), max_source_length, 1)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def decode(tokenizer: PreTrainedTokenizerBase, ids) -> list[str]:
    """Generated (or any) id rows as text: special tokens dropped, word pieces joined, WordPiece's spacing
    before punctuation cleaned up."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [text.strip() for text in texts]


def round_trip(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int | None = None) -> list[str]:
    """``texts`` as a perfect student would write them: their word pieces (the first ``max_tokens``, the most a
    student generates) decoded as ``generate`` decodes its output. Scored against the raw references, this is
    the ceiling of every student over this vocabulary."""
    pieces = tokenizer(list(texts), add_special_tokens=False, truncation=max_tokens is not None,
                       max_length=max_tokens)["input_ids"]
    return decode(tokenizer, pieces)


def _batches(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], max_source_length: int, batch_size: int):
    """(row positions, inputs) per batch, from the shortest source to the longest: each batch pads only to its own
    longest source."""
    encoded = encode_sources(tokenizer, sources, max_source_length)
    lengths = encoded["attention_mask"].sum(1)
    order = np.argsort(lengths.numpy(), kind="stable")
    for start in range(0, len(order), batch_size):
        rows = torch.from_numpy(order[start:start + batch_size])
        width = int(lengths[rows].max())
        yield rows.tolist(), {key: value[rows, :width] for key, value in encoded.items()}


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
             max_source_length: int = 64, max_new_tokens: int = 64, num_beams: int = 1,
             batch_size: int = 32) -> list[str]:
    """The model's output for each of ``sources``, in their order: greedy when ``num_beams`` is 1, beam search
    otherwise (no sampling; the library's default length penalty, 1.0). Generation stops at the model's end
    token ([SEP]) or after ``max_new_tokens`` tokens."""
    if num_beams < 1 or batch_size < 1:
        raise ValueError(f"num_beams and batch_size must be at least 1, got {num_beams} and {batch_size}")
    model.eval()
    outputs: list[str | None] = [None] * len(sources)
    for rows, inputs in _batches(tokenizer, sources, max_source_length, batch_size):
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        for row, text in zip(rows, decode(tokenizer, ids.cpu()), strict=True):
            outputs[row] = text
    return outputs


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("no sentences to score")


def sentence_statistics(hypotheses: Sequence[str], references: Sequence[str],
                        lowercase: bool = False) -> tuple[list[float], np.ndarray]:
    """Each sentence's BLEU (``sacrebleu.sentence_bleu``, with its sentence-level defaults: effective order,
    exponential smoothing) and its sufficient statistics, int64 [N, 2 + 2 · 4]: hypothesis length, reference
    length, n-gram matches and hypothesis n-grams for n = 1..4. Summed over any set of sentences, the statistics
    give that set's corpus BLEU (``bleu_from_statistics``)."""
    _check_pairs(hypotheses, references)
    scores, rows = [], []
    for hypothesis, reference in zip(hypotheses, references):
        score = sacrebleu.sentence_bleu(hypothesis, [reference], lowercase=lowercase)
        scores.append(float(score.score))
        rows.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    return scores, np.asarray(rows, dtype=np.int64)


def bleu_from_statistics(totals: np.ndarray) -> float:
    """Corpus BLEU from summed sentence statistics, as ``sacrebleu.corpus_bleu`` computes it (4-grams,
    exponential smoothing, no effective order)."""
    totals = [int(value) for value in totals]
    return float(BLEU.compute_bleu(correct=totals[2:2 + NGRAM_ORDER], total=totals[2 + NGRAM_ORDER:],
                                   sys_len=totals[0], ref_len=totals[1], smooth_method="exp").score)


def text_scores(hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False) -> dict:
    """Corpus BLEU (``sacrebleu.corpus_bleu``: 13a tokenisation, lowercased with ``lowercase``; 0-100) and the
    mean ROUGE-L F1 over sentences (0-1), plus each sentence's BLEU and ROUGE-L F1 (``sentence_bleu``,
    ``sentence_rougeL``), for paired tests between two systems."""
    # Imported here: rouge-score imports NLTK (for its stemmer), seconds of start-up a planner importing the
    # stages should not pay.
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=lowercase)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [float(scorer.score(reference, hypothesis)["rougeL"].fmeasure)  # score(target, prediction)
             for hypothesis, reference in zip(hypotheses, references)]
    sentence_bleu, _ = sentence_statistics(hypotheses, references, lowercase)
    return {"bleu": float(bleu.score), "rougeL": float(np.mean(rouge)), "sentence_bleu": sentence_bleu,
            "sentence_rougeL": rouge}


def paired_bootstrap(system_a: Sequence[str], system_b: Sequence[str], references: Sequence[str],
                     samples: int = 1000, seed: int = 0, lowercase: bool = False) -> dict:
    """Koehn's (2004) paired bootstrap resampling on corpus BLEU: ``samples`` times, draw as many sentence
    indices as there are sentences, with replacement, and score both systems' corpus BLEU on that same draw
    (from each sentence's sacreBLEU statistics, so a sample costs a sum, not a re-tokenisation).

    Returns the observed corpus BLEUs and their ``difference`` (A − B), the share of samples A wins
    (``a_wins``), loses (``b_wins``; the rest are ties), the 95% percentile interval of the sampled difference,
    and the two-sided p-value of "no difference": 2 · min(share of samples with A ≤ B, share with A ≥ B), each
    share counted as (count + 1) / (samples + 1) so that no finite number of samples claims p = 0, capped at 1.
    A system compared with itself gets p = 1. Deterministic for a given ``seed``.
    """
    if len(system_a) != len(system_b):
        raise ValueError(f"system A has {len(system_a)} sentences, system B {len(system_b)}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    _, stats_a = sentence_statistics(system_a, references, lowercase)
    _, stats_b = sentence_statistics(system_b, references, lowercase)
    bleu_a, bleu_b = bleu_from_statistics(stats_a.sum(0)), bleu_from_statistics(stats_b.sum(0))
    rng = np.random.default_rng(seed)
    count = len(references)
    differences = np.empty(samples)
    for sample in range(samples):
        drawn = rng.integers(0, count, size=count)
        differences[sample] = bleu_from_statistics(stats_a[drawn].sum(0)) - bleu_from_statistics(stats_b[drawn].sum(0))
    not_better = (np.count_nonzero(differences <= 0) + 1) / (samples + 1)
    not_worse = (np.count_nonzero(differences >= 0) + 1) / (samples + 1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"bleu_a": bleu_a, "bleu_b": bleu_b, "difference": bleu_a - bleu_b,
            "a_wins": float(np.mean(differences > 0)), "b_wins": float(np.mean(differences < 0)),
            "ci95": [float(low), float(high)], "p_value": float(min(1.0, 2 * min(not_better, not_worse))),
            "samples": samples, "seed": seed}


@torch.no_grad()
def generation_latencies(models: Sequence[PreTrainedModel], tokenizers: Sequence[PreTrainedTokenizerBase],
                         sources: Sequence[str], batch_size: int = 32, max_source_length: int = 64,
                         max_new_tokens: int = 64, warmup: int = 2, repeats: int = 5,
                         threads: int | None = None) -> list[dict]:
    """Wall time of greedy generation for one batch, the first ``batch_size`` of ``sources`` (already encoded:
    tokenisation and decoding are not timed), per model, the models taken in turn within every repeat
    (``kd.evaluation.measure_latencies`` says why: a burst of other work then costs every model a sample, not one
    model its whole run), on each model's device with torch threads pinned (``threads``, None: all cores); the
    median of ``repeats`` runs after ``warmup``. Generation stops when every row has ended, so the time depends on
    how long the model's outputs are: ``new_tokens`` is the number of decoding steps the batch took."""
    if not sources:
        raise ValueError("no sources to time")
    inputs = []
    for model, tokenizer in zip(models, tokenizers, strict=True):
        encoded = encode_sources(tokenizer, list(sources[:batch_size]), max_source_length)
        inputs.append({key: value.to(model.device) for key, value in encoded.items()})
        model.eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    timings: list[list[float]] = [[] for _ in models]
    steps = [0] * len(models)
    try:
        for run in range(warmup + repeats):
            for index, (model, model_inputs) in enumerate(zip(models, inputs)):
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                start = time.perf_counter()
                ids = model.generate(**model_inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                if run >= warmup:
                    timings[index].append(time.perf_counter() - start)
                steps[index] = int(ids.shape[1]) - 1
    finally:
        torch.set_num_threads(previous)
    results = []
    for model_inputs, model_timings, new_tokens in zip(inputs, timings, steps):
        rows = int(model_inputs["input_ids"].shape[0])
        median = float(np.median(model_timings))
        results.append({"sentences_per_second": rows / median, "ms_per_batch": 1000 * median, "batch_size": rows,
                        "new_tokens": new_tokens})
    return results


def generation_latency(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str],
                       **settings) -> dict:
    """``generation_latencies`` of one model."""
    return generation_latencies([model], [tokenizer], sources, **settings)[0]
