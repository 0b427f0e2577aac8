"""Ray Data: an English corpus for general (task-agnostic) distillation, streamed as one string column ``text``.

``corpus.source`` names where the sentences come from:

- ``wordnet`` (the default): the definitions and usage examples of WordNet 3.0, from Debian's ``wordnet-base``
  package, fetched once with ``apt-get download``, hash-checked, and cached as one sentence a line. It needs no
  model or data hub, so it works offline.
- ``task``: the task's prepared train split (both texts of a pair, as consecutive lines).
- ``augmented``: the augmented transfer corpus that the augment stage wrote.
- a local path: a ``.txt`` file (one sentence or paragraph a line), a ``.parquet`` or ``.jsonl`` file, or a folder
  of such files.
- ``hub:NAME`` or ``hub:NAME/CONFIG`` (``hub:OWNER/NAME/CONFIG``): the train split of a Hugging Face dataset,
  streamed; it needs network.

Whatever the source, blank lines are dropped and the rest stripped, so a consumer sees only text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from kd.batching import TEXT_A, TEXT_B
from kd.errors import StageError
from stages.config import AUGMENTED, HUB, TASK, TEXT, WORDNET, CorpusConfig
from stages.data import cache_dir

log = logging.getLogger(__name__)

# The file types a local source may hold; .txt files are read a line a row, the others by ``text_column``.
LOCAL_SUFFIXES = (".txt", ".parquet", ".jsonl")

WORDNET_PACKAGE = "wordnet-base"
WORDNET_VERSION = "1:3.0-37"  # Debian bookworm's; another version has another hash and is refused
WORDNET_SHA256 = "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"
# Debian's pool names the file without the version's epoch.
WORDNET_DEB = "wordnet-base_3.0-37_all.deb"
WORDNET_URL = f"https://deb.debian.org/debian/pool/main/w/wordnet/{WORDNET_DEB}"
WORDNET_PARTS = ("data.noun", "data.verb", "data.adj", "data.adv")
# Glosses such as "a dog" or "(music) loudly" carry too little sentence structure to distil on.
MIN_WORDS = 3
# Usage examples follow the definition as `; "example"`; a break is a semicolon before an opening quote, so a
# semicolon inside an example does not split it.
EXAMPLE_BREAK = re.compile(r';\s*(?=")')
# What a refusal suggests instead of WordNet; the task's definitions (stages.data) pass their own.
CORPUS_INSTEAD = "set corpus.source to a local text file with one sentence a line"


# --- WordNet -------------------------------------------------------------------------------------------------


def gloss_sentences(gloss: str) -> list[str]:
    """A synset's gloss as its definition and its usage examples, each stripped.

    A gloss reads ``definition; "example one"; "example two"- Author``: the definition is everything before the
    first quote; an example loses its quotes and any attribution after its closing quote.
    """
    definition, quote, examples = gloss.partition('"')
    sentences = [definition.strip().rstrip(";").strip()]
    if quote:
        for piece in EXAMPLE_BREAK.split(quote + examples):
            example = piece.strip().removeprefix('"')
            if '"' in example:
                example = example[: example.rindex('"')]
            sentences.append(example.strip())
    return sentences


def synset_lines(files: Iterable[Path]) -> Iterator[tuple[str, str]]:
    """``(head, gloss)`` of each synset line of WordNet ``data.*`` files, in file order.

    A synset line starts with its 8-digit byte offset and ends with `` | `` and the gloss; the head before it is
    ``offset lex_filenum ss_type w_cnt word lex_id ...``. The licence text at the top of each file is indented
    and so skipped.
    """
    for path in files:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line[:1].isdigit():
                    continue
                head, bar, gloss = line.partition(" | ")
                if bar:
                    yield head, gloss


def parse_wordnet(files: Iterable[Path]) -> list[str]:
    """The distinct sentences of WordNet ``data.*`` files, in file order, those under ``MIN_WORDS`` words left out."""
    sentences: dict[str, None] = {}  # a dict keeps the first occurrence's order
    for _, gloss in synset_lines(files):
        for sentence in gloss_sentences(gloss):
            if len(sentence.split()) >= MIN_WORDS:
                sentences.setdefault(sentence)
    return list(sentences)


def wordnet_target() -> Path:
    return cache_dir() / "wordnet" / "sentences.txt"


def by_hand(instead: str = CORPUS_INSTEAD) -> str:
    """How to do without apt-get: the .deb placed in the cache by hand, or another source (``instead``)."""
    return (f"To get it by hand, download {WORDNET_URL} (sha256 {WORDNET_SHA256}) to "
            f"{wordnet_target().parent / WORDNET_DEB} and run again (unpacking it needs dpkg-deb), or {instead}.")


def download_wordnet(scratch: Path, instead: str = CORPUS_INSTEAD) -> Path:
    """The pinned wordnet-base .deb: the one placed in the cache by hand, else fetched by apt-get into scratch."""
    placed = wordnet_target().parent / WORDNET_DEB
    if placed.exists():
        log.info("using %s, placed by hand", placed)
        return placed
    if shutil.which("apt-get") is None:
        raise StageError(f"the WordNet corpus comes from the Debian package {WORDNET_PACKAGE} {WORDNET_VERSION}, "
                         f"but apt-get is not on this machine. {by_hand(instead)}")
    log.info("fetching %s %s with apt-get download (once)", WORDNET_PACKAGE, WORDNET_VERSION)
    # apt-get download writes into the working folder and needs no root.
    done = subprocess.run(["apt-get", "download", f"{WORDNET_PACKAGE}={WORDNET_VERSION}"], cwd=scratch, check=False,
                          capture_output=True, text=True)
    debs = sorted(scratch.glob(f"{WORDNET_PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        raise StageError(f"apt-get could not download {WORDNET_PACKAGE} {WORDNET_VERSION} "
                         f"({done.stderr.strip()[-300:] or 'no .deb written'}); if apt has no package lists yet, "
                         f"run apt-get update as root first. {by_hand(instead)}")
    return debs[0]


def check_wordnet(deb: Path, instead: str = CORPUS_INSTEAD) -> None:
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != WORDNET_SHA256:
        raise StageError(f"{deb.name} has sha256 {digest}, but {WORDNET_PACKAGE} {WORDNET_VERSION} has "
                         f"{WORDNET_SHA256}: refusing it (another version, or a damaged download). {by_hand(instead)}")


def unpack_wordnet(deb: Path, root: Path, instead: str = CORPUS_INSTEAD) -> list[Path]:
    """The WordNet ``data.*`` files, wherever the package puts them (Debian: usr/share/wordnet/)."""
    if shutil.which("dpkg-deb") is None:
        raise StageError(f"unpacking {deb.name} needs dpkg-deb, which is not on this machine; {instead} instead")
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StageError(f"dpkg-deb could not unpack {deb.name}: {done.stderr.strip()[-300:]}")
    files = []
    for name in WORDNET_PARTS:
        found = sorted(root.rglob(name))
        if not found:
            raise StageError(f"{deb.name} holds no WordNet {name}")
        files.append(found[0])
    return files


@contextmanager
def unpacked_wordnet(instead: str = CORPUS_INSTEAD) -> Iterator[list[Path]]:
    """The ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` files of the pinned wordnet-base .deb:
    placed by hand or fetched with apt-get, hash-checked and unpacked into a scratch folder that is removed on
    leaving. What each WordNet product (this corpus, the task's definitions in ``stages.data``) is built from;
    ``instead`` is the alternative a refusal suggests."""
    with tempfile.TemporaryDirectory() as scratch:
        deb = download_wordnet(Path(scratch), instead)
        check_wordnet(deb, instead)
        yield unpack_wordnet(deb, Path(scratch) / "root", instead)


def fetch_wordnet() -> Path:
    """WordNet 3.0's definitions and usage examples, one sentence a line, fetched and parsed once and cached at
    ``cache_dir()/wordnet/sentences.txt``; later calls return that path at once."""
    target = wordnet_target()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with unpacked_wordnet() as files:
        sentences = parse_wordnet(files)
    # Written aside and renamed, so a crash never leaves a half file that the next call would take as done.
    partial = target.with_suffix(".partial")
    partial.write_text("".join(f"{sentence}\n" for sentence in sentences), encoding="utf-8")
    os.replace(partial, target)
    log.info("WordNet corpus: %d sentences from %s %s in %.1f s, cached at %s", len(sentences), WORDNET_PACKAGE,
             WORDNET_VERSION, time.monotonic() - started, target)
    return target


# --- the config and the reader -------------------------------------------------------------------------------


def stripped_text(table: pa.Table) -> pa.Table:
    """The ``text`` column as strings, each stripped, the empty ones and nulls dropped."""
    text = pc.utf8_trim_whitespace(table[TEXT].cast(pa.string()))
    return pa.table({TEXT: text}).filter(pc.fill_null(pc.not_equal(text, ""), False))


def interleaved_texts(table: pa.Table) -> pa.Table:
    """``text_a`` (and ``text_b``) as one ``text`` column, a pair's two texts on consecutive lines."""
    sides = [table[column].to_pylist() for column in (TEXT_A, TEXT_B) if column in table.column_names]
    return pa.table({TEXT: pa.array([text for row in zip(*sides) for text in row], pa.string())})


def as_text(dataset: ray.data.Dataset, column: str, where: str) -> ray.data.Dataset:
    """``dataset``'s ``column`` alone, named ``text``; a dataset without it is refused."""
    columns = dataset.columns()
    if columns is None:
        raise StageError(f"corpus {where} has no rows")
    if column not in columns:
        raise StageError(f"corpus {where} has no column {column!r} (set corpus.text_column); it has {columns}")
    dataset = dataset.select_columns([column])
    return dataset if column == TEXT else dataset.rename_columns({column: TEXT})


def stage_texts(source: str, task_dir: Path | None, augment_dir: Path | None) -> ray.data.Dataset:
    """The text columns of a stage's Parquet output: the data stage's ``train.parquet``, or the folder ``data``
    of Parquet files that the augment stage writes; both have the task's ``text_a`` [and ``text_b``]."""
    stage, folder, name = ("data", task_dir, "train.parquet") if source == TASK else ("augment", augment_dir, "data")
    if folder is None:
        raise StageError(f"corpus.source {source!r} reads the {stage} stage's output, but none was given")
    dataset = ray.data.read_parquet(str(folder / name))
    columns = dataset.columns() or []
    if TEXT_A not in columns:
        raise StageError(f"corpus {source!r} ({folder / name}) has no column {TEXT_A!r}; it has {columns}")
    return dataset.select_columns([c for c in (TEXT_A, TEXT_B) if c in columns]).map_batches(
        interleaved_texts, batch_format="pyarrow")


def file_texts(files: list[Path], suffix: str, column: str, where: str) -> ray.data.Dataset:
    """Files of one kind through Ray's reader for it: text a line a row, Parquet and JSON Lines by ``column``."""
    paths = [str(path) for path in files]
    if suffix == ".txt":
        return ray.data.read_text(paths)
    read = ray.data.read_parquet if suffix == ".parquet" else ray.data.read_json
    return as_text(read(paths), column, where)


def local_texts(path: Path, column: str) -> ray.data.Dataset:
    """A file, or every .txt/.parquet/.jsonl file under a folder, each kind by its own Ray reader."""
    where = repr(str(path))
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise StageError(f"corpus {where}: unsupported file type {path.suffix!r}; use one of "
                             f"{', '.join(LOCAL_SUFFIXES)}, or a folder of them")
        return file_texts([path], path.suffix.lower(), column, where)
    by_suffix = {suffix: sorted(p for p in path.rglob(f"*{suffix}") if p.is_file()) for suffix in LOCAL_SUFFIXES}
    parts = [file_texts(files, suffix, column, where) for suffix, files in by_suffix.items() if files]
    if not parts:
        raise StageError(f"corpus folder {where} holds no {', '.join(LOCAL_SUFFIXES)} files")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def hub_name(name: str) -> tuple[str, str | None]:
    """(dataset, config): ``NAME`` has no config; the last ``/`` starts one, so ``glue/sst2`` reads as task
    sources read it and ``OWNER/NAME/CONFIG`` works too (``OWNER/NAME/`` for an owned dataset without configs)."""
    if "/" not in name:
        return name, None
    path, _, config = name.rpartition("/")
    return path, config or None


def hub_texts(name: str, column: str) -> ray.data.Dataset:
    """The train split of a Hugging Face dataset, streamed rather than downloaded whole."""
    import datasets

    path, config = hub_name(name)
    try:
        loaded = datasets.load_dataset(path, config, split="train", streaming=True)
        dataset = ray.data.from_huggingface(loaded)
    except Exception as error:  # the hub and its loaders raise many types; the user needs the name and why
        raise StageError(f"cannot stream dataset {name!r} from the Hugging Face hub: {error}") from None
    return as_text(dataset, column, repr(HUB + name))


def corpus_dataset(cfg: CorpusConfig, task_dir: Path | None = None,
                   augment_dir: Path | None = None) -> ray.data.Dataset:
    """The corpus as a Ray Dataset with one string column ``text``, read lazily and streamed: nothing is read
    whole into the driver. ``task_dir`` is the data stage's output, ``augment_dir`` the augment stage's, for the
    ``task`` and ``augmented`` sources. An empty corpus is refused where it is read, by the worker that finds no
    text in it (``kd.general.BlockStream``)."""
    source = cfg.source
    if source == WORDNET:
        texts = ray.data.read_text(str(fetch_wordnet()))
    elif source in (TASK, AUGMENTED):
        texts = stage_texts(source, task_dir, augment_dir)
    elif source.startswith(HUB):
        texts = hub_texts(source.removeprefix(HUB), cfg.text_column)
    else:
        # Resolved: Ray's readers may run in other working folders.
        texts = local_texts(Path(source).expanduser().resolve(), cfg.text_column)
    texts = texts.map_batches(stripped_text, batch_format="pyarrow")
    return texts if cfg.max_sentences is None else texts.limit(cfg.max_sentences)
