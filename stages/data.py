"""Task data: the packaged rt-snippets corpus, Hugging Face hub datasets, or local files, normalised to
Parquet splits with columns text_a, [text_b,] label (a class index, or a float for regression); for a seq2seq task
(the packaged WordNet definitions, or pairs from the hub or local files) with columns source and target."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from kd.batching import LABEL, TEXT_A, TEXT_B
from stages.config import RT_SNIPPETS, StageConfig, TaskConfig
from kd.errors import StageError

log = logging.getLogger(__name__)

ROLES = ("train", "dev", "test")
READERS = {
    ".csv": lambda path: pd.read_csv(path),
    ".tsv": lambda path: pd.read_csv(path, sep="\t", quoting=3),
    ".jsonl": lambda path: pd.read_json(path, lines=True),
    ".parquet": pd.read_parquet,
}

VADER_SDIST = "vaderSentiment==3.3.2"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
RT_SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
# The packaged seq2seq task: WordNet 3.0's usage examples, each with its word, to the synset's definition.
WORDNET_DEFINITIONS = "wordnet-definitions"
# A seq2seq task's columns, in its source files by default and always in the Parquet splits written here.
SOURCE, TARGET = "source", "target"
# The adjective position markers WordNet appends to a lemma in data.adj: (a), (p), (ip).
ADJECTIVE_MARKER = re.compile(r"\([a-z]+\)$")
# A refusal lists this many problems, each with this many rows, so a wrong label column stays one readable line.
SHOWN_PROBLEMS = 5
SHOWN_ROWS = 5


def cache_dir() -> Path:
    return Path(os.environ.get("KD_PIPELINE_CACHE", Path.home() / ".cache" / "kd-pipeline"))


# --- rt-snippets ---------------------------------------------------------------------------------------------


def fetch_rt_snippets() -> Path:
    """The 10,605 Rotten Tomatoes snippets (the sentences SST was built from), fetched once from the package
    registry inside the vaderSentiment source archive, hash-checked, and cached as TSV."""
    target = cache_dir() / "rt-snippets" / "movieReviewSnippets_GroundTruth.txt"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        log.info("fetching %s from the package registry (once)", VADER_SDIST)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", VADER_SDIST, "-d", scratch]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(scratch).glob("vaderSentiment-3.3.2.tar.gz"))
        if done.returncode != 0 or not archives:
            raise StageError(f"could not fetch {VADER_SDIST} for rt-snippets: {done.stderr.strip()[-500:]}")
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != VADER_SHA256:
            raise StageError(f"{archives[0].name} has sha256 {digest}, expected {VADER_SHA256}; refusing it")
        with tarfile.open(archives[0]) as outer:
            inner_bytes = outer.extractfile(VADER_INNER_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            text = inner.extractfile(RT_SNIPPETS_MEMBER).read()
    partial = target.with_suffix(".partial")
    partial.write_bytes(text)
    os.replace(partial, target)
    return target


def load_rt_snippets() -> pd.DataFrame:
    """id<TAB>mean rating in [-4, 4]<TAB>text; rating > 0 is positive (1), < 0 negative (0), 0 is dropped."""
    rows = []
    for line in fetch_rt_snippets().read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows.append((float(parts[1]), parts[2].strip()))
    frame = pd.DataFrame(rows, columns=["rating", "sentence"])
    neutral = int((frame.rating == 0).sum())
    log.info("rt-snippets: %d sentences, %d with rating 0 dropped", len(frame), neutral)
    frame = frame[frame.rating != 0]
    return pd.DataFrame({"sentence": frame.sentence, "label": (frame.rating > 0).astype(int)}).reset_index(drop=True)


# --- WordNet definitions ------------------------------------------------------------------------------------


def synset_lemmas(head: str) -> list[str]:
    """The words of a synset line's head (``offset lex_filenum ss_type w_cnt word lex_id ...``, w_cnt in hex),
    underscores as spaces and adjective markers dropped: ``a_cappella`` → ``a cappella``, ``galore(ip)`` →
    ``galore``."""
    fields = head.split()
    count = int(fields[3], 16)
    return [ADJECTIVE_MARKER.sub("", word).replace("_", " ") for word in fields[4:4 + 2 * count:2]]


def mentions(lemma: str, example: str) -> bool:
    """Whether ``example`` has ``lemma`` as a whole word or phrase, in any case (``brush`` is in "a Brush with
    danger" but not in "brushes" or "toothbrush")."""
    if lemma.lower() not in example.lower():  # most lemmas are not there: skip the regular expression
        return False
    return re.search(rf"(?<!\w){re.escape(lemma)}(?!\w)", example, re.IGNORECASE) is not None


def definition_pairs(files) -> pd.DataFrame:
    """Definition modelling pairs from WordNet ``data.*`` files, in file order: for each usage example that has
    one of its synset's lemmas (the first of them that it has), ``source`` = ``"<lemma> : <example>"`` and
    ``target`` = the synset's definition; ``synset`` is ``<ss_type>.<offset>``. Exact duplicate pairs are kept
    once. The gloss is split as the general-distillation corpus splits it (``stages.corpus.gloss_sentences``)."""
    from stages.corpus import gloss_sentences, synset_lines  # here: stages.corpus imports this module

    rows = []
    for head, gloss in synset_lines(files):
        definition, *examples = gloss_sentences(gloss)
        if not definition:
            continue
        lemmas = synset_lemmas(head)
        offset, _, kind = head.split()[:3]
        for example in examples:
            lemma = next((lemma for lemma in lemmas if mentions(lemma, example)), None)
            if lemma is not None:
                rows.append((f"{lemma} : {example}", definition, f"{kind}.{offset}"))
    pairs = pd.DataFrame(rows, columns=[SOURCE, TARGET, "synset"], dtype="string")
    return pairs.drop_duplicates([SOURCE, TARGET]).reset_index(drop=True)


def definitions_target() -> Path:
    return cache_dir() / "wordnet" / "definitions.parquet"


def fetch_wordnet_definitions() -> Path:
    """The WordNet definition pairs, built once from the same pinned, hash-checked wordnet-base .deb as the
    general-distillation corpus (``stages.corpus.unpacked_wordnet``) and cached at
    ``cache_dir()/wordnet/definitions.parquet``; later calls return that path at once."""
    from stages.corpus import WORDNET_PACKAGE, WORDNET_VERSION, unpacked_wordnet

    target = definitions_target()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    instead = "set task.source to a local file of pairs with source_column and target_column"
    with unpacked_wordnet(instead) as files:
        pairs = definition_pairs(files)
    # Written aside and renamed, so a crash never leaves a half file that the next call would take as done.
    partial = target.with_suffix(".partial")
    pairs.to_parquet(partial, index=False)
    os.replace(partial, target)
    log.info("WordNet definitions: %d pairs from %s %s, cached at %s", len(pairs), WORDNET_PACKAGE, WORDNET_VERSION,
             target)
    return target


def load_wordnet_definitions() -> pd.DataFrame:
    return pd.read_parquet(fetch_wordnet_definitions())


# --- local files and the hub ---------------------------------------------------------------------------------


def read_table(path: Path) -> pd.DataFrame:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise StageError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
    try:
        return reader(path)
    except UnicodeDecodeError as error:
        raise StageError(f"{path} is not valid UTF-8 (byte {error.start}): re-encode it as UTF-8") from None
    except Exception as error:  # parsers raise many types; the user needs the file and the reason
        raise StageError(f"cannot read {path}: {type(error).__name__}: {error}") from None


def read_rows(path: Path, split: str | None = None) -> pd.DataFrame:
    frame = read_table(path)
    if frame.empty:
        for_split = f" (split {split!r})" if split else ""
        raise StageError(f"{path}{for_split} has no rows: a task file needs at least one row below its header")
    return frame


def load_local(path: Path, task: TaskConfig) -> dict[str, pd.DataFrame]:
    if path.is_file():
        return {"all": read_rows(path)}
    if not path.is_dir():
        raise StageError(f"task.source {str(path)!r} is neither a known dataset nor an existing file or folder")
    frames = {}
    for name in {task.splits.train, task.splits.dev, task.splits.test} - {None}:
        files = [path / f"{name}{suffix}" for suffix in READERS if (path / f"{name}{suffix}").exists()]
        if files:
            frames[name] = read_rows(files[0], name)
    if task.splits.train not in frames:
        raise StageError(f"{path} has no {task.splits.train}.csv/.tsv/.jsonl/.parquet for the train split")
    return frames


def hub_dataset(name: str) -> tuple[str, str | None]:
    """A hub source as (dataset, configuration): ``glue/sst2`` (GLUE's configurations, as GLUE's own docs name
    them), ``OWNER/NAME/CONFIG``, or any other name as it is."""
    parts = name.split("/")
    if parts[0] == "glue" and len(parts) == 2:
        return "nyu-mll/glue", parts[1]
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2]
    return name, None


def load_hub(name: str) -> dict[str, pd.DataFrame]:
    import datasets

    path, subset = hub_dataset(name)
    try:
        loaded = datasets.load_dataset(path, subset)
    except Exception as error:
        raise StageError(f"cannot load dataset {name!r} from the Hugging Face hub: {error}") from None
    return {split: loaded[split].to_pandas() for split in loaded}


def load_source(task: TaskConfig) -> dict[str, pd.DataFrame]:
    if task.source == RT_SNIPPETS:
        return {"all": load_rt_snippets()}
    if task.source == WORDNET_DEFINITIONS:
        return {"all": load_wordnet_definitions()}
    path = Path(task.source).expanduser()
    if path.exists() or path.suffix.lower() in READERS:
        return load_local(path, task)
    return load_hub(task.source)


# --- normalising, checking and splitting ---------------------------------------------------------------------


def plain(value):
    """A cell as its file has it: numpy scalars as Python ones (``2``, not ``np.int64(2)``), and a whole float as
    an int, because pandas reads an integer column with an empty cell as float (``1.0`` is the file's ``1``)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def is_blank(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return bool(pd.api.types.is_scalar(value) and pd.isna(value))


def describe_rows(problems: dict[str, list]) -> str:
    """``rows 3, 7: empty label; row 12: label 'meh' is not one of ['neg', 'pos']``, shortened for many."""
    parts = []
    for reason, rows in list(problems.items())[:SHOWN_PROBLEMS]:
        listed = ", ".join(str(row) for row in rows[:SHOWN_ROWS])
        more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
        parts.append(f"{'row' if len(rows) == 1 else 'rows'} {listed}{more}: {reason}")
    if len(problems) > SHOWN_PROBLEMS:
        parts.append(f"{len(problems) - SHOWN_PROBLEMS} other problem(s)")
    return "; ".join(parts)


def origin(task: TaskConfig, split: str) -> str:
    return task.source if split == "all" else f"split {split!r} of {task.source}"


def refuse_or_skip(task: TaskConfig, where: str, count: int, problems: dict[str, list]) -> None:
    """``count`` bad rows, their reasons and row numbers in ``problems``: one StageError (``bad_rows: error``), or
    a log line saying they are skipped."""
    detail = describe_rows(problems)
    if task.bad_rows == "error":
        raise StageError(f"{where}: {count} row(s) cannot be used (rows numbered from 0, the header not counted): "
                         f"{detail}. Fix the data, or set task.bad_rows: skip to drop such rows.")
    log.warning("%s: skipped %d row(s) that cannot be used: %s", where, count, detail)


def pair_column(frame: pd.DataFrame, column: str) -> pd.Series | None:
    """A text column, or with ``FIELD.KEY`` a key of a column of mappings (a translation dataset's
    ``translation.de``); None when there is no such column."""
    if column in frame.columns:
        return frame[column]
    field, _, key = column.partition(".")
    if not key or field not in frame.columns:
        return None
    cells = frame[field].map(lambda cell: cell.get(key) if isinstance(cell, dict) else None)
    return None if cells.isna().all() else cells


def normalise_pairs(frame: pd.DataFrame, task: TaskConfig, split: str) -> tuple[pd.DataFrame, int]:
    """A seq2seq task's rows as ``source`` and ``target`` strings, stripped; rows with an empty source or target
    are refused, or skipped and counted."""
    where = origin(task, split)
    columns = {name: pair_column(frame, column) for column, name in ((task.source_column, SOURCE),
                                                                     (task.target_column, TARGET))}
    missing = [column for column, name in ((task.source_column, SOURCE), (task.target_column, TARGET))
               if columns[name] is None]
    if missing:
        raise StageError(f"{where} has no column(s) {missing}; it has {list(frame.columns)}")
    out = pd.DataFrame(index=frame.index)
    for name, values in columns.items():
        out[name] = values.astype("string").str.strip()
    empty = {name: (out[name].isna() | (out[name] == "")).to_numpy() for name in (SOURCE, TARGET)}
    bad = empty[SOURCE] | empty[TARGET]
    count = int(bad.sum())
    if count:
        problems: dict[str, list] = {}
        for row, no_source, no_target in zip(frame.index[bad], empty[SOURCE][bad], empty[TARGET][bad]):
            reasons = [reason for flag, reason in ((no_source, "empty source"), (no_target, "empty target")) if flag]
            problems.setdefault(" and ".join(reasons), []).append(row)
        refuse_or_skip(task, where, count, problems)
    out = kept_rows(out, bad, count, where)
    return out.reset_index(drop=True), count


def kept_rows(out: pd.DataFrame, bad, count: int, where: str) -> pd.DataFrame:
    """The rows that are not ``bad``; none left is an error, whether the file was empty or every row was bad."""
    out = out[~bad]
    if out.empty:
        left = f" left after skipping {count} bad row(s)" if count else ""
        raise StageError(f"{where} has no rows{left}")
    return out


def normalise(frame: pd.DataFrame, task: TaskConfig, split: str) -> tuple[pd.DataFrame, int]:
    """Canonical columns; rows with an empty text or label, or an undeclared label, are refused, or skipped and
    counted."""
    if task.task_type == "seq2seq":
        return normalise_pairs(frame, task, split)
    where = origin(task, split)
    missing = [c for c in [*task.text_columns, task.label_column] if c not in frame.columns]
    if missing:
        raise StageError(f"{where} has no column(s) {missing}; it has {list(frame.columns)}")
    out = pd.DataFrame(index=frame.index)
    for source, target in zip(task.text_columns, (TEXT_A, TEXT_B)):
        out[target] = frame[source].astype("string").str.strip()
    empty = out[[TEXT_A, TEXT_B][: len(task.text_columns)]].isna().any(axis=1) | (
        out[[TEXT_A, TEXT_B][: len(task.text_columns)]] == ""
    ).any(axis=1)
    raw_labels = frame[task.label_column]
    blank_label = raw_labels.map(is_blank).astype(bool)
    if task.task_type == "regression":
        out[LABEL] = pd.to_numeric(raw_labels, errors="coerce")
        undeclared = out[LABEL].isna() & ~blank_label
        expected = "is not a number"
    else:
        index_of = {str(label): i for i, label in enumerate(task.labels)}
        out[LABEL] = raw_labels.map(lambda v: index_of.get(str(plain(v)), -1))
        undeclared = (out[LABEL] < 0) & ~blank_label
        expected = f"is not one of {task.labels}"
    bad = empty | blank_label | undeclared
    count = int(bad.sum())
    if count:
        problems: dict[str, list] = {}
        flags = zip(frame.index[bad], empty[bad], blank_label[bad], undeclared[bad], raw_labels[bad])
        for row, no_text, no_label, wrong_label, label in flags:
            reasons = [reason for flag, reason in ((no_text, "empty text"), (no_label, "empty label"),
                                                   (wrong_label, f"label {plain(label)!r} {expected}")) if flag]
            problems.setdefault(" and ".join(reasons), []).append(row)
        refuse_or_skip(task, where, count, problems)
    out = kept_rows(out, bad, count, where)
    if task.task_type == "classification":
        out[LABEL] = out[LABEL].astype("int64")
    return out.reset_index(drop=True), count


def _carve(frame: pd.DataFrame, role: str, fraction: float, seed: int, stratify: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        rest, carved = train_test_split(frame, test_size=fraction, random_state=seed,
                                        stratify=frame[LABEL] if stratify else None)
    except ValueError as error:  # too few rows, or a class too rare, to split off this fraction
        by_label = " stratified by label" if stratify else ""
        raise StageError(f"cannot carve the {role} split ({fraction:.0%}{by_label}) from {len(frame)} row(s): "
                         f"{str(error).rstrip('.')}. Give the task more rows, or a {role} split of its own.") from None
    return rest.reset_index(drop=True), carved.reset_index(drop=True)


def _carve_groups(frame: pd.DataFrame, role: str, fraction: float, seed: int, column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Like ``_carve``, but rows with the same ``column`` value stay together: whole groups, drawn in a seeded
    order, go to the carved split until it has ``fraction`` of the rows (a little more, as groups are whole).
    Both parts keep the frame's row order."""
    codes, groups = pd.factorize(frame[column])
    sizes = np.bincount(codes, minlength=len(groups))
    order = np.random.default_rng(seed).permutation(len(groups))
    wanted = round(fraction * len(frame))
    taken = int(np.searchsorted(np.cumsum(sizes[order]), wanted)) + 1
    if wanted < 1 or taken >= len(groups):
        raise StageError(f"cannot carve the {role} split ({fraction:.0%}, whole groups of equal {column}) from "
                         f"{len(frame)} row(s) in {len(groups)} group(s). Give the task more rows, or a {role} split "
                         "of its own.")
    carved = np.isin(codes, order[:taken])
    return frame[~carved].reset_index(drop=True), frame[carved].reset_index(drop=True)


def assign_roles(frames: dict[str, pd.DataFrame], task: TaskConfig) -> dict[str, pd.DataFrame]:
    """Map source splits to train/dev/test; what is missing is carved from train with a fixed seed,
    stratified by label (80/10/10 for a single-file corpus). WordNet definitions are carved by definition, so
    that no definition is in two splits."""
    stratify = task.task_type == "classification"
    train_fraction, dev_fraction, test_fraction = task.split_fractions
    if "all" in frames and task.task_type == "seq2seq" and task.source == WORDNET_DEFINITIONS:
        rest, test = _carve_groups(frames["all"], "test", test_fraction, task.split_seed, TARGET)
        train, dev = _carve_groups(rest, "dev", dev_fraction / (train_fraction + dev_fraction), task.split_seed, TARGET)
        return {"train": train, "dev": dev, "test": test}
    if "all" in frames:
        rest, test = _carve(frames["all"], "test", test_fraction, task.split_seed, stratify)
        train, dev = _carve(rest, "dev", dev_fraction / (train_fraction + dev_fraction), task.split_seed, stratify)
        return {"train": train, "dev": dev, "test": test}
    named = {role: getattr(task.splits, role) for role in ROLES}
    for role, name in named.items():
        if name is not None and name not in frames:
            raise StageError(f"task.splits.{role}: the source has no split {name!r}; it has {sorted(frames)}")
    roles = {role: frames[name] for role, name in named.items() if name is not None}
    for role, fraction in (("test", test_fraction), ("dev", dev_fraction)):
        if role not in roles:
            roles["train"], roles[role] = _carve(roles["train"], role, fraction, task.split_seed, stratify)
    return roles


def cap_rows(frame: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).reset_index(drop=True)


def prepare(task: TaskConfig, out: Path) -> dict:
    """Load, check, split and write the task. Returns the facts recorded in result.json."""
    raw = load_source(task)
    skipped = {}
    normalised = {}
    for split, frame in raw.items():
        normalised[split], skipped[split] = normalise(frame, task, split)
    roles = {role: cap_rows(frame, task.max_rows, task.split_seed) for role, frame in assign_roles(normalised, task).items()}
    result: dict = {"rows": {}, "skipped": skipped, "label_counts": {}}
    for role, frame in roles.items():
        frame.to_parquet(out / f"{role}.parquet", index=False)
        result["rows"][role] = len(frame)
        if task.task_type == "classification":
            result["label_counts"][role] = {str(k): int(v) for k, v in frame[LABEL].value_counts().sort_index().items()}
    return result


class Config(StageConfig):
    task: TaskConfig


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    return prepare(cfg.task, out)
