"""Task loading: local formats, sentence pairs, refusing or skipping bad rows, splits, rt-snippets."""

import re

import pandas as pd
import pytest

from pipeline.config import TaskConfig
from stages.data import fetch_rt_snippets, load_rt_snippets, prepare
from kd.errors import StageError


def frame(n=60, pair=False):
    rows = {"sentence": [f"sentence number {i}" for i in range(n)], "label": ["pos" if i % 3 else "neg" for i in range(n)]}
    if pair:
        rows["other"] = [f"second part {i}" for i in range(n)]
    return pd.DataFrame(rows)


def write(df, path):
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_formats_split_80_10_10(tmp_path, suffix):
    source = write(frame(100), tmp_path / f"data{suffix}")
    out = tmp_path / "out"
    out.mkdir()
    result = prepare(TaskConfig(source=str(source), labels=["neg", "pos"]), out)
    assert result["rows"] == {"train": 80, "dev": 10, "test": 10}
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == ["text_a", "label"] and set(train.label) == {0, 1}


def test_split_is_seeded_and_stratified(tmp_path):
    source = write(frame(300), tmp_path / "d.csv")
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        prepare(TaskConfig(source=str(source), labels=["neg", "pos"]), tmp_path / name)
        outputs.append(pd.read_parquet(tmp_path / name / "test.parquet"))
    pd.testing.assert_frame_equal(*outputs)
    assert outputs[0].label.mean() == pytest.approx(2 / 3, abs=0.04)


def test_sentence_pairs(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        write(frame(30, pair=True), folder / f"{split}.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    prepare(TaskConfig(source=str(folder), text_columns=["sentence", "other"], labels=["neg", "pos"]), out)
    dev = pd.read_parquet(out / "dev.parquet")
    assert list(dev.columns) == ["text_a", "text_b", "label"] and dev.text_b.iloc[0].startswith("second part")


def test_bad_rows_are_refused_with_count_and_first_row(tmp_path):
    df = frame(40)
    df.loc[5, "sentence"] = "   "
    df.loc[9, "label"] = "meh"
    source = write(df, tmp_path / "d.csv")
    with pytest.raises(StageError) as caught:
        prepare(TaskConfig(source=str(source), labels=["neg", "pos"]), tmp_path)
    message = str(caught.value)
    assert "2 row(s)" in message and "row 5" in message and "bad_rows: skip" in message


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    df = frame(40)
    df.loc[5, "sentence"] = None
    df.loc[9, "label"] = "meh"
    source = write(df, tmp_path / "d.csv")
    result = prepare(TaskConfig(source=str(source), labels=["neg", "pos"], bad_rows="skip"), tmp_path)
    assert result["skipped"] == {"all": 2} and sum(result["rows"].values()) == 38


def test_empty_label_cells_are_the_only_bad_rows(tmp_path):
    # pandas reads an integer column with empty cells as float: 1.0 must still match the declared label 1
    df = pd.DataFrame({"sentence": [f"review {i}" for i in range(40)], "label": [i % 2 for i in range(40)]})
    df.loc[[3, 7], "label"] = None
    source = write(df, tmp_path / "d.csv")
    with pytest.raises(StageError) as caught:
        prepare(TaskConfig(source=str(source), labels=[0, 1]), tmp_path)
    message = str(caught.value)
    assert "2 row(s)" in message and "rows 3, 7: empty label." in message
    out = tmp_path / "out"
    out.mkdir()
    result = prepare(TaskConfig(source=str(source), labels=[0, 1], bad_rows="skip"), out)
    assert result["skipped"] == {"all": 2} and sum(result["rows"].values()) == 38
    assert set(pd.read_parquet(out / "train.parquet").label) == {0, 1}


def test_undeclared_labels_are_shown_as_written(tmp_path):
    df = pd.DataFrame({"sentence": [f"review {i}" for i in range(30)], "label": [i % 3 for i in range(30)]})
    source = write(df, tmp_path / "d.csv")
    with pytest.raises(StageError) as caught:
        prepare(TaskConfig(source=str(source), labels=[0, 1]), tmp_path)
    message = str(caught.value)
    assert "rows 2, 5, 8, 11, 14 and 5 more: label 2 is not one of [0, 1]" in message and "np." not in message


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_a_file_without_rows_is_named(tmp_path, suffix):
    source = write(frame(0), tmp_path / f"d{suffix}")
    with pytest.raises(StageError, match=f"^{re.escape(str(source))} has no rows"):
        prepare(TaskConfig(source=str(source), labels=["neg", "pos"]), tmp_path)


def test_a_split_file_without_rows_is_named_with_its_split(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    write(frame(30), folder / "train.csv")
    (folder / "validation.csv").write_text("sentence,label\n")
    with pytest.raises(StageError, match=r"validation\.csv \(split 'validation'\) has no rows"):
        prepare(TaskConfig(source=str(folder), labels=["neg", "pos"]), tmp_path)


def test_skipping_every_row_is_refused(tmp_path):
    source = write(frame(30), tmp_path / "d.csv")
    with pytest.raises(StageError, match="has no rows left after skipping 30 bad row"):
        prepare(TaskConfig(source=str(source), labels=["good", "bad"], bad_rows="skip"), tmp_path)


def test_too_few_rows_to_carve_a_split_is_explained(tmp_path):
    source = write(frame(5), tmp_path / "d.csv")
    with pytest.raises(StageError, match="cannot carve the test split .* from 5 row"):
        prepare(TaskConfig(source=str(source), labels=["neg", "pos"]), tmp_path)


def test_missing_column_names_what_exists(tmp_path):
    source = write(frame(20), tmp_path / "d.csv")
    with pytest.raises(StageError, match=r"no column\(s\) \['text'\]; it has \['sentence', 'label'\]"):
        prepare(TaskConfig(source=str(source), text_columns=["text"], labels=["neg", "pos"]), tmp_path)


def test_non_utf8_file_is_explained(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("sentence,label\ncaf\xe9 au lait,pos\n".encode("latin-1"))
    with pytest.raises(StageError, match="not valid UTF-8"):
        prepare(TaskConfig(source=str(path), labels=["neg", "pos"]), tmp_path)


def test_regression_labels(tmp_path):
    df = pd.DataFrame({"sentence": [f"s {i}" for i in range(50)], "score": [i / 10 for i in range(50)]})
    source = write(df, tmp_path / "r.parquet")
    out = tmp_path / "out"
    out.mkdir()
    prepare(TaskConfig(source=str(source), label_column="score", task_type="regression"), out)
    assert pd.read_parquet(out / "train.parquet").label.dtype == float


def test_rt_snippets_is_fetched_checked_and_binary():
    fetch_rt_snippets()
    corpus = load_rt_snippets()
    assert len(corpus) == 10_605 - 37  # the 37 neutral (rating 0) sentences are dropped
    assert set(corpus.label) == {0, 1} and corpus.label.mean() == pytest.approx(0.5, abs=0.02)


def test_rt_snippets_max_rows_caps_every_split(tmp_path):
    result = prepare(TaskConfig(max_rows=50), tmp_path)
    assert result["rows"] == {"train": 50, "dev": 50, "test": 50}
