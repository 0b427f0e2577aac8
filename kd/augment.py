"""Transfer-corpus augmentation rules, as pure functions of their input and an explicit, seeded RNG.

Tang et al. (2019), "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", §3.3:

- per word, draw X ~ U[0, 1]: if X < p_mask the word becomes the mask token; else if X < p_mask + p_pos it
  becomes another word with the same POS tag, drawn from the corpus unigram distribution renormalised within
  that tag; otherwise it stays;
- per example, with probability p_ng keep only a random contiguous n-gram, n ~ U{1, ..., 5};
- up to N distinct synthetic copies per sentence (N = 20).

TinyBERT (Jiao et al., 2020), §3.1: each word is replaced with probability p = 0.4 by a word drawn from its
top-K masked-LM candidates (K = 15). The masked-LM itself is the caller's ``candidates_fn``.

Nothing here loads a model: tagging takes a loaded spaCy pipeline, candidates come from a callable.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import Counter, defaultdict
from itertools import accumulate
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

MASK_TOKEN = "[MASK]"
# Short sentences have few distinct variants (a two-word sentence has a handful), so drawing stops after this
# many tries per wanted copy instead of looping forever.
ATTEMPTS_PER_COPY = 10

TaggedSentence = Sequence[tuple[str, str]]
CandidatesFn = Callable[[Sequence[str], int], Sequence[str]]
Copy = TypeVar("Copy", bound=Hashable)


class AugmentSettings(BaseModel):
    """Augmentation probabilities; defaults are the papers' (Tang et al. for the first five, TinyBERT for mlm_*)."""

    model_config = ConfigDict(extra="forbid")

    p_mask: float = Field(default=0.1, ge=0, le=1, description="Per word: replace by the mask token.")
    p_pos: float = Field(default=0.1, ge=0, le=1, description="Per word (when not masked): same-POS replacement.")
    p_ng: float = Field(default=0.25, ge=0, le=1, description="Per example: keep one random n-gram.")
    max_ngram: int = Field(default=5, ge=1, description="n is uniform in 1..max_ngram, clipped to the length.")
    copies: int = Field(default=20, ge=0, description="Distinct augmented copies wanted per sentence.")
    mlm_p: float = Field(default=0.4, ge=0, le=1, description="TinyBERT: per-word masked-LM replacement rate.")
    mlm_k: int = Field(default=15, ge=1, description="TinyBERT: replacements come from the top-K candidates.")
    seed: int = 0

    @model_validator(mode="after")
    def _word_rates_fit(self) -> "AugmentSettings":
        if self.p_mask + self.p_pos > 1:
            raise ValueError(f"p_mask + p_pos = {self.p_mask + self.p_pos} exceeds 1; both are per-word rates")
        return self


def pos_tag(texts: Iterable[str], nlp, batch_size: int = 256) -> list[list[tuple[str, str]]]:
    """(word, fine-grained tag) pairs per text from a loaded spaCy pipeline.

    Penn Treebank tags (``token.tag_``: NN vs NNS, VBD vs VBZ) rather than coarse UPOS keep the inflection, so a
    plural noun is replaced by a plural noun and the synthetic sentence stays grammatical.
    """
    return [
        [(token.text, token.tag_) for token in doc if not token.is_space]
        for doc in nlp.pipe(texts, batch_size=batch_size)
    ]


class PosVocabulary:
    """Word counts per POS tag, for sampling a replacement from the unigram distribution renormalised by tag."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for word, tag in pairs:
            counts[tag][word] += 1
        # Sorted words make sampling depend on the corpus content only, not on the order it was read in.
        self._words = {tag: sorted(counter) for tag, counter in counts.items()}
        self._cumulative = {tag: list(accumulate(counts[tag][w] for w in words)) for tag, words in self._words.items()}
        self._index = {tag: {w: i for i, w in enumerate(words)} for tag, words in self._words.items()}

    @property
    def tags(self) -> list[str]:
        return sorted(self._words)

    def words(self, tag: str) -> list[str]:
        return list(self._words.get(tag, ()))

    def count(self, word: str, tag: str) -> int:
        index = self._index.get(tag, {}).get(word)
        if index is None:
            return 0
        cumulative = self._cumulative[tag]
        return cumulative[index] - (cumulative[index - 1] if index else 0)

    def sample(self, tag: str, rng: random.Random, exclude: str | None = None) -> str | None:
        """A word w ≠ ``exclude`` with P(w) = c(w, tag) / (Σ_v c(v, tag) − c(exclude, tag)); None if there is none.

        The excluded word's slice of the cumulative counts is skipped, so the draw is exact and needs one
        random number, however frequent the excluded word is.
        """
        cumulative = self._cumulative.get(tag)
        if not cumulative:
            return None
        low = width = 0
        index = self._index[tag].get(exclude) if exclude is not None else None
        if index is not None:
            low = cumulative[index - 1] if index else 0
            width = cumulative[index] - low
        remaining = cumulative[-1] - width
        if remaining == 0:
            return None
        r = rng.randrange(remaining)
        if r >= low:
            r += width
        return self._words[tag][bisect_right(cumulative, r)]


def mask_and_replace(
    words: Sequence[str], tags: Sequence[str], vocabulary: PosVocabulary, p_mask: float, p_pos: float,
    rng: random.Random, mask_token: str = MASK_TOKEN,
) -> list[str]:
    """Tang et al.'s word rules: X ~ U[0,1]; X < p_mask → mask; p_mask ≤ X < p_mask + p_pos → same-tag word.

    p_pos is therefore the unconditional replacement rate. A tag with no other word keeps the word.
    """
    out = []
    for word, tag in zip(words, tags, strict=True):
        x = rng.random()
        if x < p_mask:
            out.append(mask_token)
        elif x < p_mask + p_pos:
            replacement = vocabulary.sample(tag, rng, exclude=word)
            out.append(word if replacement is None else replacement)
        else:
            out.append(word)
    return out


def ngram_sample(words: Sequence[str], max_ngram: int, rng: random.Random) -> list[str]:
    """A contiguous n-gram of ``words``: n ~ U{1..max_ngram} clipped to len(words), start uniform."""
    if not words:
        return []
    n = min(rng.randint(1, max_ngram), len(words))
    start = rng.randrange(len(words) - n + 1)
    return list(words[start : start + n])


def augment_sentence(
    words: Sequence[str], tags: Sequence[str], vocabulary: PosVocabulary, settings: AugmentSettings,
    rng: random.Random, mask_token: str = MASK_TOKEN,
) -> list[str]:
    """One synthetic example: the word rules, then, with probability p_ng, n-gram sampling."""
    out = mask_and_replace(words, tags, vocabulary, settings.p_mask, settings.p_pos, rng, mask_token)
    if rng.random() < settings.p_ng:
        out = ngram_sample(out, settings.max_ngram, rng)
    return out


def augment_pair(
    a: TaggedSentence, b: TaggedSentence, vocabulary: PosVocabulary, settings: AugmentSettings,
    rng: random.Random, mask_token: str = MASK_TOKEN,
) -> tuple[list[str], list[str]]:
    """Both sides of a sentence pair augmented independently, each with its own word and n-gram draws."""
    first = augment_sentence(*_split(a), vocabulary, settings, rng, mask_token)
    second = augment_sentence(*_split(b), vocabulary, settings, rng, mask_token)
    return first, second


def distinct_copies(original: Copy, draw: Callable[[], Copy], n_copies: int) -> list[Copy]:
    """Up to ``n_copies`` distinct results of ``draw()``, none equal to ``original``, in the order drawn.

    Stops after ATTEMPTS_PER_COPY · n_copies draws, so a sentence with few possible variants yields fewer.
    """
    seen = {original}
    out: list[Copy] = []
    for _ in range(ATTEMPTS_PER_COPY * n_copies):
        if len(out) == n_copies:
            break
        candidate = draw()
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out


def sentence_rng(seed: int, text: str) -> random.Random:
    """An RNG seeded by (seed, sentence text).

    Random's string seeding hashes with SHA-512, independent of PYTHONHASHSEED, so each sentence gets the
    same copies whichever process, batch or position it lands in: Ray Data may split the corpus any way.
    """
    return random.Random(f"{seed}\x00{text}")


def _split(sentence: TaggedSentence) -> tuple[list[str], list[str]]:
    return [word for word, _ in sentence], [tag for _, tag in sentence]


def _sentence_copies(
    sentence: TaggedSentence, n_copies: int, vocabulary: PosVocabulary, settings: AugmentSettings, mask_token: str
) -> list[str]:
    words, tags = _split(sentence)
    original = " ".join(words)
    rng = sentence_rng(settings.seed, original)
    return distinct_copies(
        original, lambda: " ".join(augment_sentence(words, tags, vocabulary, settings, rng, mask_token)), n_copies
    )


def _pair_copies(
    a: TaggedSentence, b: TaggedSentence, n_copies: int, vocabulary: PosVocabulary, settings: AugmentSettings,
    mask_token: str,
) -> list[tuple[str, str]]:
    original = (" ".join(_split(a)[0]), " ".join(_split(b)[0]))
    rng = sentence_rng(settings.seed, "\x00".join(original))

    def draw() -> tuple[str, str]:
        first, second = augment_pair(a, b, vocabulary, settings, rng, mask_token)
        return " ".join(first), " ".join(second)

    return distinct_copies(original, draw, n_copies)


def augment_corpus(
    tokens_and_tags: Sequence[TaggedSentence], n_copies: int, vocabulary: PosVocabulary, settings: AugmentSettings,
    mask_token: str = MASK_TOKEN,
) -> list[list[str]]:
    """Per sentence, up to ``n_copies`` distinct augmented texts (space-joined words), the original excluded."""
    return [_sentence_copies(sentence, n_copies, vocabulary, settings, mask_token) for sentence in tokens_and_tags]


def augment_pair_corpus(
    pairs: Sequence[tuple[TaggedSentence, TaggedSentence]], n_copies: int, vocabulary: PosVocabulary,
    settings: AugmentSettings, mask_token: str = MASK_TOKEN,
) -> list[list[tuple[str, str]]]:
    """Per sentence pair, up to ``n_copies`` distinct augmented (text_a, text_b) pairs, the original excluded."""
    return [_pair_copies(a, b, n_copies, vocabulary, settings, mask_token) for a, b in pairs]


def mlm_replace(
    words: Sequence[str], candidates_fn: CandidatesFn, p: float = 0.4, k: int = 15, *, rng: random.Random
) -> list[str]:
    """TinyBERT's rule: each word, with probability p, becomes a uniform draw from its top-K candidates.

    ``candidates_fn(words, i)`` ranks replacements for position i in the original sentence (a masked-LM run
    with word i masked). It is called only for the positions chosen for replacement, since each call costs a
    teacher forward. The word itself is dropped from its top-K (a masked LM often ranks the original first),
    so a chosen position really changes; with no other candidate it stays.
    """
    out = list(words)
    for i, word in enumerate(words):
        if rng.random() < p:
            choices = [c for c in list(candidates_fn(words, i))[:k] if c != word]
            if choices:
                out[i] = rng.choice(choices)
    return out
