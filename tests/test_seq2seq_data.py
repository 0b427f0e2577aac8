"""task_type: seq2seq: its config, local pair files through the data stage (columns, splits, bad rows), and the
packaged WordNet definitions (pair extraction on a fake data.noun, the split by definition, the real fetch)."""

import logging

import pandas as pd
import pytest
from pydantic import ValidationError

from conftest import needs_apt
from kd.errors import StageError
from pipeline.config import ConfigError, validate
from stages import corpus
from stages.config import TaskConfig
from stages.data import definition_pairs, fetch_wordnet_definitions, prepare

# What WordNet 3.0 from wordnet-base 1:3.0-37 gives; another count means the pair extraction changed.
WORDNET_PAIRS = 38_959
WORDNET_SPLITS = {"train": 31_166, "dev": 3_896, "test": 3_897}


def pairs_frame(n=100, source="question", target="answer"):
    return pd.DataFrame({source: [f"what is number {i}" for i in range(n)], target: [f"it is {i}" for i in range(n)],
                         "id": range(n)})


def write(df, path):
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)
    return path


def out_dir(tmp_path, name="out"):
    out = tmp_path / name
    out.mkdir()
    return out


def seq2seq(source, **fields) -> TaskConfig:
    return TaskConfig(source=str(source), task_type="seq2seq", **fields)


# --- the config ----------------------------------------------------------------------------------------------


def test_a_seq2seq_task_has_source_and_target_columns_and_no_labels():
    task = seq2seq("pairs.jsonl")
    assert (task.source_column, task.target_column, task.labels, task.num_labels) == ("source", "target", None, 0)
    assert TaskConfig(source="wordnet-definitions", task_type="seq2seq").labels is None
    # The classification defaults and messages are as they were.
    assert TaskConfig().labels == [0, 1] and TaskConfig().task_type == "classification"
    with pytest.raises(ValidationError, match="a classification task must declare its labels"):
        TaskConfig(source="x.csv")


def test_labels_are_refused_for_seq2seq_with_one_message():
    with pytest.raises(ValidationError) as refused:
        seq2seq("pairs.jsonl", labels=[0, 1])
    assert len(refused.value.errors()) == 1
    assert "a seq2seq task has no labels: remove labels" in str(refused.value)


def test_packaged_sources_of_the_other_kind_are_refused():
    with pytest.raises(ValidationError, match="wordnet-definitions is a text-to-text task: set task_type: seq2seq"):
        TaskConfig(source="wordnet-definitions")
    with pytest.raises(ValidationError, match="a seq2seq task needs a source of text pairs.*rt-snippets is a "
                                              "classification task"):
        TaskConfig(task_type="seq2seq")


def test_a_classifier_method_on_a_seq2seq_task_is_refused():
    document = {"name": "t", "students": [{"name": "s", "method": "kd", "student": {"layers": 2}}],
                "task": {"source": "wordnet-definitions", "task_type": "seq2seq"}}
    with pytest.raises(ConfigError, match="kd trains students for classification and regression tasks, not seq2seq"):
        validate(document)
    document["students"][0]["method"] = "nll"
    assert validate(document).students[0].method == "nll"
    document["task"]["labels"] = [0, 1]
    with pytest.raises(ConfigError, match="task: Value error, a seq2seq task has no labels"):
        validate(document)


# --- local files through the data stage ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_local_pair_file_becomes_source_and_target_splits_80_10_10(tmp_path, suffix):
    path = write(pairs_frame(100), tmp_path / f"pairs{suffix}")
    out = out_dir(tmp_path)
    result = prepare(seq2seq(path, source_column="question", target_column="answer"), out)
    assert result["rows"] == {"train": 80, "dev": 10, "test": 10} and result["skipped"] == {"all": 0}
    splits = {role: pd.read_parquet(out / f"{role}.parquet") for role in ("train", "dev", "test")}
    for frame in splits.values():
        assert list(frame.columns) == ["source", "target"]
        assert all(isinstance(value, str) for value in [*frame.source, *frame.target])
    together = pd.concat(splits.values())
    assert sorted(together.source) == sorted(f"what is number {i}" for i in range(100))
    assert all(f"it is {s.removeprefix('what is number ')}" == t for s, t in zip(together.source, together.target))


def test_the_split_is_seeded_and_max_rows_caps_every_split(tmp_path):
    path = write(pairs_frame(200, "source", "target"), tmp_path / "pairs.parquet")
    first, second = (prepare(seq2seq(path), out_dir(tmp_path, name)) for name in ("a", "b"))
    assert first == second
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "test.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "test.parquet"))
    assert prepare(seq2seq(path, max_rows=15), out_dir(tmp_path, "c"))["rows"] == {"train": 15, "dev": 15, "test": 15}


def test_a_folder_of_split_files_keeps_its_splits(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, n in (("train", 30), ("validation", 12), ("test", 11)):
        write(pairs_frame(n, "source", "target"), folder / f"{split}.jsonl")
    result = prepare(seq2seq(folder), out_dir(tmp_path))
    assert result["rows"] == {"train": 30, "dev": 12, "test": 11}


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    path = write(pairs_frame(20), tmp_path / "pairs.csv")
    with pytest.raises(StageError, match=r"has no column\(s\) \['target'\]; it has \['question', 'answer', 'id'\]"):
        prepare(seq2seq(path, source_column="question"), tmp_path)
    with pytest.raises(StageError, match=r"has no column\(s\) \['source', 'target'\]"):
        prepare(seq2seq(path), tmp_path)


def test_empty_targets_are_refused_with_their_count_and_first_rows(tmp_path):
    df = pairs_frame(40, "source", "target")
    df.loc[[3, 8, 9, 12, 20, 31, 33], "target"] = ["", "  ", None, "", "", "", ""]
    df.loc[8, "source"] = ""
    path = write(df, tmp_path / "pairs.jsonl")
    with pytest.raises(StageError) as refused:
        prepare(seq2seq(path), tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{path}: 7 row(s) cannot be used (rows numbered from 0, the header not counted): ")
    assert "rows 3, 9, 12, 20, 31 and 1 more: empty target" in message
    assert "row 8: empty source and empty target" in message
    assert message.endswith("Fix the data, or set task.bad_rows: skip to drop such rows.")


def test_bad_rows_skip_drops_empty_pairs_with_a_log_line(tmp_path, caplog):
    df = pairs_frame(50, "source", "target")
    df.loc[[4, 7], "target"] = ""
    df.loc[11, "source"] = None
    path = write(df, tmp_path / "pairs.jsonl")
    with caplog.at_level(logging.WARNING, logger="stages.data"):
        result = prepare(seq2seq(path, bad_rows="skip"), out_dir(tmp_path))
    assert result["skipped"] == {"all": 3} and sum(result["rows"].values()) == 47
    assert "skipped 3 row(s) that cannot be used: rows 4, 7: empty target; row 11: empty source" in caplog.text


# --- WordNet definitions -------------------------------------------------------------------------------------

# data.* lines as WordNet writes them: the indented licence header, a synset with two lemmas and examples that
# name either, one example without its lemma, a multi-word lemma (underscores), a lemma only as part of another
# word, an adjective marker, a definition with a semicolon, an attributed example, and a repeated synset.
FAKE_DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  16 THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON  
00003553 03 n 02 whole 0 unit 0 001 @ 00002684 n 0000 | an assemblage of parts that is regarded as a single entity; "how big is that part compared to the whole?"; "the team is a unit"; "they arrived together"  
00039545 04 n 01 brush 4 001 @ 00039297 n 0000 | contact with something dangerous or undesirable; "I had a Brush with danger on my way to work"; "he tried to avoid any brushes with the police"  
00001740 02 r 02 a_cappella 0 without_accompaniment 0 000 | without musical accompaniment; "they performed a cappella"  
01675190 00 s 01 galore(ip) 0 001 & 01675040 a 0000 | in great numbers; plenty; "there were daffodils galore"  
01784295 00 s 01 abstemious 0 001 & 01783158 a 0000 | sparing in consumption of especially food and drink; "the pleasures of the table, never of much consequence to one naturally abstemious"- John Galsworthy  
00039916 04 n 01 fetch 0 001 @ 00037396 n 0000 | the action of fetching  
00039546 04 n 01 brush 4 001 @ 00039297 n 0000 | contact with something dangerous or undesirable; "I had a Brush with danger on my way to work"  
"""

FAKE_PAIRS = [
    ("whole : how big is that part compared to the whole?", "an assemblage of parts that is regarded as a single entity",
     "n.00003553"),
    ("unit : the team is a unit", "an assemblage of parts that is regarded as a single entity", "n.00003553"),
    ("brush : I had a Brush with danger on my way to work", "contact with something dangerous or undesirable",
     "n.00039545"),
    ("a cappella : they performed a cappella", "without musical accompaniment", "r.00001740"),
    ("galore : there were daffodils galore", "in great numbers; plenty", "s.01675190"),
    ("abstemious : the pleasures of the table, never of much consequence to one naturally abstemious",
     "sparing in consumption of especially food and drink", "s.01784295"),
]


def test_definition_pairs_from_a_fake_data_file(tmp_path):
    data = tmp_path / "data.noun"
    data.write_text(FAKE_DATA_NOUN, encoding="utf-8")
    pairs = definition_pairs([data])
    assert list(pairs.columns) == ["source", "target", "synset"]
    assert list(pairs.itertuples(index=False, name=None)) == FAKE_PAIRS


def cached_definitions(tmp_path, monkeypatch, groups=60):
    """A definitions cache as fetch_wordnet_definitions leaves it: 1 to 3 examples per definition."""
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path / "cache"))
    rows = [(f"word{g} : example {e} of word{g}", f"definition number {g}", f"n.{g:08d}")
            for g in range(groups) for e in range(1 + g % 3)]
    (tmp_path / "cache" / "wordnet").mkdir(parents=True)
    pd.DataFrame(rows, columns=["source", "target", "synset"]).to_parquet(
        tmp_path / "cache" / "wordnet" / "definitions.parquet")
    return len(rows)


def test_wordnet_definitions_are_split_by_definition(tmp_path, monkeypatch):
    total = cached_definitions(tmp_path, monkeypatch)
    task = TaskConfig(source="wordnet-definitions", task_type="seq2seq")
    out = out_dir(tmp_path)
    result = prepare(task, out)
    assert sum(result["rows"].values()) == total == 120
    assert result["rows"]["test"] >= 12 and result["rows"]["dev"] >= 12 and result["rows"]["train"] <= 96
    splits = {role: pd.read_parquet(out / f"{role}.parquet") for role in ("train", "dev", "test")}
    assert all(list(frame.columns) == ["source", "target"] for frame in splits.values())
    definitions = {role: set(frame.target) for role, frame in splits.items()}
    assert not definitions["train"] & definitions["test"]
    assert not definitions["train"] & definitions["dev"] and not definitions["dev"] & definitions["test"]
    assert prepare(task, out_dir(tmp_path, "again")) == result
    pd.testing.assert_frame_equal(splits["test"], pd.read_parquet(tmp_path / "again" / "test.parquet"))
    capped = TaskConfig(source="wordnet-definitions", task_type="seq2seq", max_rows=10)
    assert prepare(capped, out_dir(tmp_path, "capped"))["rows"] == {"train": 10, "dev": 10, "test": 10}


def test_too_few_definitions_to_carve_a_split_is_explained(tmp_path, monkeypatch):
    cached_definitions(tmp_path, monkeypatch, groups=1)
    with pytest.raises(StageError, match=r"cannot carve the test split \(10%, whole groups of equal target\) from "
                                         r"1 row\(s\) in 1 group\(s\)"):
        prepare(TaskConfig(source="wordnet-definitions", task_type="seq2seq"), tmp_path)


def test_a_deb_with_another_hash_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    (tmp_path / "wordnet").mkdir()
    (tmp_path / "wordnet" / corpus.WORDNET_DEB).write_bytes(b"not the package")
    with pytest.raises(StageError, match=rf"has sha256 .*but wordnet-base 1:3\.0-37 has {corpus.WORDNET_SHA256}.*"
                                         r"or set task\.source to a local file of pairs"):
        fetch_wordnet_definitions()
    assert sorted(p.name for p in (tmp_path / "wordnet").iterdir()) == [corpus.WORDNET_DEB]


@pytest.mark.slow
@needs_apt
def test_fetch_wordnet_definitions_downloads_checks_and_caches_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PIPELINE_CACHE", str(tmp_path))
    path = fetch_wordnet_definitions()
    assert path == tmp_path / "wordnet" / "definitions.parquet"
    assert sorted(p.name for p in path.parent.iterdir()) == ["definitions.parquet"]  # no .partial, no scratch left
    pairs = pd.read_parquet(path)
    assert len(pairs) == WORDNET_PAIRS and not pairs.duplicated(["source", "target"]).any()
    assert ("whole : how big is that part compared to the whole?",
            "an assemblage of parts that is regarded as a single entity") in set(zip(pairs.source, pairs.target))
    assert all(" : " in source for source in pairs.source) and pairs.target.str.len().min() > 0
    monkeypatch.setattr(corpus, "download_wordnet", lambda *args: pytest.fail("cached pairs are fetched again"))
    assert fetch_wordnet_definitions() == path
    out = out_dir(tmp_path)
    assert prepare(TaskConfig(source="wordnet-definitions", task_type="seq2seq"), out)["rows"] == WORDNET_SPLITS
    train, test = (set(pd.read_parquet(out / f"{role}.parquet").target) for role in ("train", "test"))
    assert not train & test

