"""``summary.json``: what one seed of a run measured, the teacher and every student (and the ensemble), as one
typed and versioned model. ``pipeline.summary`` builds it and writes it to the workdir; the report, the registry
and the benchmarks read it back through ``Summary.read``, so a field is named and typed here and nowhere else.

A generation task's summary (``GenerationSummary``, ``kind: generation``) has students of its own kind: BLEU and
ROUGE-L instead of a task metric, and the C-MLM teacher instead of a classifier.

Version 2 gives each student its ``family`` and whether it is a ``baseline`` (learns from gold labels alone), which
the report's choice of baseline reads; version 1 had neither. A file without ``schema_version`` was written before
the version was recorded, so it is version 1. A file of another version, or one that lacks a field, is refused with
the way to rewrite it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kd.students import InitStrategy

SCHEMA_VERSION = 2
REWRITE = ("rerun `python -m pipeline run` with the run's config, which recomputes none of the stages cached in "
           "the workdir and rewrites the summaries")

# A task's metrics by name: accuracy, F1 and MCC, or Pearson and Spearman for regression.
Metrics = dict[str, float]


def _absent(value) -> bool:
    return value is None


class _Record(BaseModel):
    # NaN written as json.dumps writes it: a regression metric of a constant prediction is NaN, not a missing value.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, serialize_by_alias=True,
                              ser_json_inf_nan="constants")


class ParameterBreakdown(_Record):
    """A saved model's parameters, in all and split at its embedding tables (word, position, token type)."""

    params: int
    embedding_params: int
    word_embedding_params: int
    non_embedding_params: int
    vocab_size: int
    hidden_size: int
    embedding_size: int | None = None  # factorised embeddings' width (kd.models.factorised); None: hidden_size


class TeacherSummary(_Record):
    source: str
    fine_tuned: bool
    dev: Metrics
    test: Metrics
    params: int
    size_bytes: int
    latency_ms: float
    throughput: float
    parameters: ParameterBreakdown


class Init(_Record):
    """Where a student's weights started (the fine-tuned teacher, the pre-trained checkpoint, a general distillation
    or another checkpoint), and which of its layers."""

    from_: str = Field(alias="from")  # teacher, pretrained, general:NAME, or a checkpoint
    layers: InitStrategy | list[int]


class EarlyExitPoint(_Record):
    """FastBERT at one exit threshold (``speed``); the mean exit layer and the latency are on test."""

    speed: float
    dev_accuracy: float
    test_accuracy: float
    avg_exit_layer: float
    latency_ms: float
    speedup: float


class StudentSummary(_Record):
    method: str
    family: str  # kd.methods.base.Method.family: the architectures a student is compared across
    baseline: bool  # Method.is_baseline(), and not from a general distillation: no teacher anywhere
    layers: int
    init: Init
    selected_epoch: int | None
    hidden_size: int | None  # None: the teacher's width
    embedding_size: int | None = None  # factorised embeddings' width; None: the hidden width
    soft_labels: Literal["teacher", "ensemble"]
    dev: Metrics
    test: Metrics
    params: int
    size_bytes: int
    latency_ms: float
    throughput: float
    parameters: ParameterBreakdown
    compression: float
    compression_embeddings: float
    compression_non_embedding: float
    speedup: float
    teacher_signals: Literal["cached", "online", "none"]
    epochs: int
    epoch_seconds: float | None  # None when no epoch was evaluated on dev
    train_rows: int
    evaluate_dir: Path
    # Only a FastBERT student has a threshold sweep; the others' files have no such key.
    early_exit: list[EarlyExitPoint] | None = Field(default=None, exclude_if=_absent)

    @property
    def init_from(self) -> str:
        return self.init.from_

    @property
    def shape(self) -> tuple:
        """What a student is compared across: its family, layers and widths (``pipeline.report_stats``)."""
        return self.family, self.layers, self.hidden_size, self.embedding_size


class EnsembleMember(_Record):
    source: str
    seed: int
    dev: Metrics
    test: Metrics


class EnsembleSummary(_Record):
    teachers: list[EnsembleMember]
    dev: Metrics
    test: Metrics


class CmlmTeacherSummary(_Record):
    """A generation task's teacher: the checkpoint fine-tuned as a conditional masked LM, scored by its accuracy on
    masked target tokens of dev before and after."""

    source: str
    params: int
    steps: int
    masked_accuracy_before: float
    masked_accuracy_after: float


class SoftTargetCost(_Record):
    """The ``cmlm_topk`` stage: the C-MLM teacher's top-k readings of every target token of the train pairs."""

    rows: int
    seconds: float
    rows_per_second: float
    k: int
    rounds: int
    temperature: float


class BootstrapTest(_Record):
    """Koehn's paired bootstrap of test BLEU (beam) against the baseline of the student's shape, on the same test
    sentences (``kd.generation.paired_bootstrap``): ``difference`` is student − baseline, in BLEU points."""

    baseline: str
    difference: float
    ci95: list[float]
    p_value: float
    samples: int


class GenerationStudentSummary(_Record):
    """A seq2seq student: BLEU (0-100) and ROUGE-L (0-1) with beam search (``bleu``, ``rougeL``) and greedy
    decoding (``bleu_greedy``, ``rougeL_greedy``) on dev and test, and the speed of greedy generation."""

    method: str
    family: str
    baseline: bool
    encoder_layers: int
    decoder_layers: int
    hidden_size: int
    init: Literal["teacher", "random"]  # the encoder copied from a checkpoint's first layers, or random
    init_from: str  # that checkpoint: the C-MLM teacher (teacher) or the one it was fine-tuned from (pretrained)
    selected_epoch: int | None
    dev: Metrics
    test: Metrics
    params: int
    size_bytes: int
    sentences_per_second: float
    ms_per_batch: float
    epochs: int
    epoch_seconds: float | None
    train_rows: int
    evaluate_dir: Path
    against_baseline: BootstrapTest | None = None

    @property
    def shape(self) -> tuple:
        return self.family, self.encoder_layers, self.decoder_layers, self.hidden_size

    @property
    def latency_ms(self) -> float:
        """Greedy generation of one test batch (``evaluate.latency_batch_size`` sentences), as a classifier's
        latency is one batch's."""
        return self.ms_per_batch


class GenerationSummary(_Record):
    """One seed of a generation task (``task.task_type: seq2seq``): the C-MLM teacher, the cost of its readings,
    and every seq2seq student."""

    schema_version: Literal[SCHEMA_VERSION] = SCHEMA_VERSION
    kind: Literal["generation"] = "generation"
    experiment: str
    metric: Literal["bleu"] = "bleu"
    data_dir: Path
    teacher: CmlmTeacherSummary
    soft_targets: SoftTargetCost | None = Field(default=None, exclude_if=_absent)  # None: no cmlm student
    students: dict[str, GenerationStudentSummary]

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2))


class SummaryOutdated(FileNotFoundError):
    """The workdir's summary is not one this code reads. A FileNotFoundError because, like a missing summary, a run
    of the pipeline writes it, and the CLI and the registry already say so in one line."""


class Summary(_Record):
    schema_version: Literal[SCHEMA_VERSION] = SCHEMA_VERSION
    experiment: str
    metric: Literal["accuracy", "pearson"]
    data_dir: Path
    teacher: TeacherSummary
    students: dict[str, StudentSummary]
    # Only a run with a teacher ensemble has this section.
    ensemble: EnsembleSummary | None = Field(default=None, exclude_if=_absent)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2))

    @classmethod
    def read(cls, path: Path) -> Summary | GenerationSummary:
        """A classification or regression task's summary, or a generation task's (``kind: generation``)."""
        data = json.loads(path.read_text())
        version = data.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise SummaryOutdated(f"{path} has summary schema version {version}; this code reads version "
                                  f"{SCHEMA_VERSION}; {REWRITE}")
        try:
            return (GenerationSummary if data.get("kind") == "generation" else cls).model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise SummaryOutdated(f"{path} is not a version-{SCHEMA_VERSION} summary ({where}: {first['msg']}); "
                                  f"{REWRITE}") from None
