"""The general-distillation corpus: WordNet parsing and fetching, the corpus config, and the Ray Data reader over
every kind of source."""


import pandas as pd
import pytest
from pydantic import ValidationError

from conftest import needs_apt
from kd.errors import StageError
from stages import corpus
from stages.corpus import (
    CorpusConfig,
    corpus_dataset,
    fetch_wordnet,
    hub_name,
    parse_wordnet,
)

# What WordNet 3.0 from wordnet-base 1:3.0-37 gives; another count means the parser changed.
WORDNET_SENTENCES = 154_980

# The shapes data.noun really has: the indented licence header (with quotes of its own), a gloss with examples,
# a repeated definition, an attributed example, a semicolon inside an example, and glosses too short to keep.
FAKE_DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  16 THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON  
00039297 04 n 01 contact 2 005 @ 00039021 n 0000 | close interaction; "they kept in daily contact"; "they claimed that they had been in contact with extraterrestrial beings"  
00039545 04 n 01 brush 4 001 @ 00039297 n 0000 | contact with something dangerous or undesirable; "I had a brush with danger on my way to work"  
00039546 04 n 01 brush 4 001 @ 00039297 n 0000 | contact with something dangerous or undesirable; "he tried to avoid any brushes with the police"  
00039916 04 n 01 fetch 0 001 @ 00037396 n 0000 | the action of fetching  
01784295 00 s 01 abstemious 0 001 & 01783158 a 0000 | sparing in consumption of especially food and drink; "the pleasures of the table, never of much consequence to one naturally abstemious"- John Galsworthy  
00002724 29 v 01 choke 0 002 @ 00001740 v 0000 | breathe with great difficulty; "I came; I saw; I choked"  
00004227 29 v 01 gasp 0 001 @ 00001740 v 0000 | gasp; "gasp!"  
"""


def test_parse_wordnet_splits_definitions_from_examples_dedupes_and_drops_short_lines(tmp_path):
    data = tmp_path / "data.noun"
    data.write_text(FAKE_DATA_NOUN, encoding="utf-8")
    assert parse_wordnet([data]) == [
        "they kept in daily contact",
        "they claimed that they had been in contact with extraterrestrial beings",
        "contact with something dangerous or undesirable",
        "I had a brush with danger on my way to work",
        "he tried to avoid any brushes with the police",
        "the action of fetching",
        "sparing in consumption of especially food and drink",
        "the pleasures of the table, never of much consequence to one naturally abstemious",
        "breathe with great difficulty",
        "I came; I saw; I choked",
    ]


def test_a_deb_with_another_hash_is_refused(tmp_path, monkeypatch):
    """A .deb placed in the cache by hand is hash-checked like a downloaded one, and needs no network."""
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    (tmp_path / "wordnet").mkdir()
    (tmp_path / "wordnet" / corpus.WORDNET_DEB).write_bytes(b"not the package")
    with pytest.raises(StageError, match=rf"has sha256 .*but wordnet-base 1:3\.0-37 has {corpus.WORDNET_SHA256}"):
        fetch_wordnet()
    assert not (tmp_path / "wordnet" / "sentences.txt").exists()


def test_without_apt_get_the_error_says_how_to_get_the_file_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(StageError, match="apt-get is not on this machine") as refused:
        fetch_wordnet()
    assert corpus.WORDNET_URL in str(refused.value)
    assert str(tmp_path / "wordnet" / corpus.WORDNET_DEB) in str(refused.value)
    assert "corpus.source to a local text file" in str(refused.value)


@pytest.mark.slow
@needs_apt
def test_fetch_wordnet_downloads_checks_and_caches_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    path = fetch_wordnet()
    assert path == tmp_path / "wordnet" / "sentences.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == WORDNET_SENTENCES == len(set(lines))
    entity = "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"
    assert entity in lines
    assert "they kept in daily contact" in lines
    assert all(line == line.strip() and len(line.split()) >= corpus.MIN_WORDS for line in lines)
    assert sorted(p.name for p in path.parent.iterdir()) == ["sentences.txt"]  # no .partial, no scratch left
    monkeypatch.setattr(corpus, "download_wordnet", lambda scratch: pytest.fail("a cached corpus is fetched again"))
    assert fetch_wordnet() == path


@pytest.mark.slow
@needs_apt
def test_a_downloaded_deb_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "WORDNET_SHA256", "0" * 64)
    with pytest.raises(StageError, match=r"wordnet-base_1%3a3\.0-37_all\.deb has sha256 6106.*refusing it"):
        fetch_wordnet()
    assert not (tmp_path / "wordnet" / "sentences.txt").exists()


# --- the config ----------------------------------------------------------------------------------------------


def test_named_and_hub_sources_validate_and_a_missing_path_is_refused_at_once(tmp_path):
    for source in ("wordnet", "task", "augmented", "hub:wikitext/wikitext-103-raw-v1", str(tmp_path)):
        assert CorpusConfig(source=source).source == source
    with pytest.raises(ValidationError) as refused:
        CorpusConfig(source=str(tmp_path / "missing.txt"))
    assert len(refused.value.errors()) == 1
    assert "is not 'wordnet', 'task', 'augmented' or 'hub:NAME', and no file or folder of that name exists" in str(
        refused.value)
    with pytest.raises(ValidationError):
        CorpusConfig(max_sentences=0)
    with pytest.raises(ValidationError):
        CorpusConfig(text_colum="body")


def test_hub_names_split_off_a_config_after_the_last_slash():
    assert hub_name("wikitext") == ("wikitext", None)
    assert hub_name("wikitext/wikitext-103-raw-v1") == ("wikitext", "wikitext-103-raw-v1")
    assert hub_name("Salesforce/wikitext/wikitext-2-raw-v1") == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert hub_name("stanfordnlp/imdb/") == ("stanfordnlp/imdb", None)


# --- the reader ----------------------------------------------------------------------------------------------


def texts(cfg: CorpusConfig, **dirs) -> list[str]:
    dataset = corpus_dataset(cfg, **dirs)
    assert dataset.columns() == ["text"]
    return [row["text"] for row in dataset.take_all()]


@pytest.mark.ray
def test_a_text_file_is_read_a_line_a_sentence_blank_lines_dropped(ray_session, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("  the first sentence here  \n\n   \nthe second one\n\tthe third\n", encoding="utf-8")
    assert sorted(texts(CorpusConfig(source=str(source)))) == ["the first sentence here", "the second one",
                                                                "the third"]


@pytest.mark.ray
def test_a_folder_of_jsonl_files_is_read_whole(ray_session, tmp_path):
    (tmp_path / "nested").mkdir()
    pd.DataFrame({"text": ["one a", "one b"], "id": [1, 2]}).to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    pd.DataFrame({"text": ["two a", " "]}).to_json(tmp_path / "nested" / "b.jsonl", orient="records", lines=True)
    (tmp_path / "notes.md").write_text("not part of the corpus\n")
    assert sorted(texts(CorpusConfig(source=str(tmp_path)))) == ["one a", "one b", "two a"]


@pytest.mark.ray
def test_a_parquet_file_with_its_own_text_column(ray_session, tmp_path):
    source = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["alpha beta", "gamma delta", None], "text": ["x", "y", "z"]}).to_parquet(source)
    assert sorted(texts(CorpusConfig(source=str(source), text_column="body"))) == ["alpha beta", "gamma delta"]


@pytest.mark.ray
def test_task_and_augmented_give_both_texts_of_a_pair_as_consecutive_lines(ray_session, tmp_path):
    pairs = pd.DataFrame({"text_a": ["a one", "a two"], "text_b": ["b one", "b two"], "label": [0, 1]})
    pairs.to_parquet(tmp_path / "train.parquet")
    lines = texts(CorpusConfig(source="task"), task_dir=tmp_path)
    assert sorted(lines) == ["a one", "a two", "b one", "b two"]
    assert [lines[lines.index(f"a {n}") + 1] for n in ("one", "two")] == ["b one", "b two"]

    augmented = tmp_path / "augment" / "data"
    augmented.mkdir(parents=True)
    pd.DataFrame({"text_a": ["a one", "a [MASK]"], "label": [0, -1]}).to_parquet(augmented / "0.parquet")
    assert sorted(texts(CorpusConfig(source="augmented"), augment_dir=tmp_path / "augment")) == ["a [MASK]", "a one"]


@pytest.mark.ray
def test_wordnet_is_read_from_its_cache(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    (tmp_path / "wordnet").mkdir()
    (tmp_path / "wordnet" / "sentences.txt").write_text("a cached first sentence\na cached second sentence\n")
    assert sorted(texts(CorpusConfig())) == ["a cached first sentence", "a cached second sentence"]


@pytest.mark.ray
def test_a_hub_dataset_is_streamed_from_its_train_split(ray_session, monkeypatch):
    import datasets
    from ray.data._internal.datasource.huggingface_datasource import (
        HuggingFaceDatasource,
    )

    asked = []

    def load_dataset(path, config, split, streaming):
        asked.append((path, config, split, streaming))
        return datasets.Dataset.from_dict({"content": ["hub one", "hub two"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    # Offline, Ray's search for the hub's Parquet copy fails; with none found it streams the dataset itself.
    monkeypatch.setattr(HuggingFaceDatasource, "list_parquet_urls_from_dataset", classmethod(lambda cls, ds: []))
    cfg = CorpusConfig(source="hub:owner/name/config", text_column="content")
    assert sorted(texts(cfg)) == ["hub one", "hub two"]
    assert asked == [("owner/name", "config", "train", True)]


@pytest.mark.ray
def test_max_sentences_caps_the_corpus(ray_session, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("".join(f"sentence number {i}\n" for i in range(50)))
    assert len(texts(CorpusConfig(source=str(source), max_sentences=7))) == 7


@pytest.mark.ray
def test_a_missing_text_column_names_the_source_and_the_column(ray_session, tmp_path):
    source = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["alpha beta"]}).to_parquet(source)
    with pytest.raises(StageError, match=rf"corpus '{source}' has no column 'text' \(set corpus.text_column\); "
                                         r"it has \['body'\]"):
        corpus_dataset(CorpusConfig(source=str(source)))
    pd.DataFrame({"sentence": ["x"]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(StageError, match="corpus 'task' .* has no column 'text_a'"):
        corpus_dataset(CorpusConfig(source="task"), task_dir=tmp_path)
    with pytest.raises(StageError, match="reads the augment stage's output, but none was given"):
        corpus_dataset(CorpusConfig(source="augmented"))


@pytest.mark.ray
def test_blank_text_never_reaches_the_stream(ray_session, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    assert corpus_dataset(CorpusConfig(source=str(blank))).count() == 0
    source = tmp_path / "empty.parquet"
    pd.DataFrame({"body": ["", "  ", None]}).to_parquet(source)
    assert corpus_dataset(CorpusConfig(source=str(source), text_column="body")).count() == 0
    (tmp_path / "folder").mkdir()
    with pytest.raises(StageError, match="holds no .txt, .parquet, .jsonl files"):
        corpus_dataset(CorpusConfig(source=str(tmp_path / "folder")))
