"""The method contract and its registry.

A method says which teacher signals it needs (cached in Parquet, or computed online in the step), how its
student is built, which extra trainable modules it owns (projections), its training phases, and its loss as
named components plus a ``total``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from kd.batching import LABEL, Collator, length_bucketed
from kd.checkpoints import load_classifier
from kd.layer_maps import LayerMatch
from kd.students import NAMED_SOURCES, StudentShape, build_student

# mlm_topk: the teacher's top-k masked-LM distribution per token; cmlm_topk: a C-MLM teacher's top-k distribution
# per target token of a text pair (kd.cmlm, stages/cmlm_topk.py).
CACHED_SIGNALS = frozenset({"logits", "mlm_topk", "cmlm_topk"})
ONLINE_SIGNALS = frozenset({"logits", "hidden_states", "attentions"})
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
Rows = Mapping[str, Any]  # a batch of rows: column name → one value per row


def task_selection_metric(regression: bool) -> str:
    """The dev metric that picks a classifier's checkpoint: the first that ``kd.evaluation.task_metrics``
    reports."""
    return "pearson" if regression else "accuracy"


def task_dev_metrics(model: nn.Module, collator: Collator, rows: Iterable[Rows], regression: bool) -> dict:
    """A classifier's metrics on dev rows (``kd.evaluation.task_metrics`` of its logits against the gold
    labels)."""
    from kd.evaluation import predict_logits, task_metrics  # kd.evaluation imports kd.training, which imports this

    labels, encoded = [], []
    for batch in rows:
        labels.append(np.asarray(batch[LABEL]))
        encoded.append(collator.encode(batch))
    return task_metrics(predict_logits(model, encoded), np.concatenate(labels), regression)


class MethodParams(BaseModel):
    """Hyperparameters of a method. Subclasses add fields; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Phase:
    """A stretch of training with its own loss terms; ``epochs=None`` takes the student's train.epochs."""

    name: str
    epochs: int | None = None


@dataclass
class TeacherOutputs:
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Method(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    cached_signals: ClassVar[frozenset[str]] = frozenset()
    online_signals: ClassVar[frozenset[str]] = frozenset()
    student_outputs: ClassVar[frozenset[str]] = frozenset()  # "hidden_states" / "attentions" the loss reads
    default_init: ClassVar[str] = "uniform"
    # What a student trains on when its entry does not say: the task's train split, or the augmented corpus.
    default_data: ClassVar[Literal["task", "augmented"]] = "task"

    # Its loss or inference needs class probabilities (a regression task has none). The registered ``kl``,
    # ``soft_ce`` and ``ce`` losses serve a regression task as they are (MSE on one output column, to the teacher's
    # score or to the float label), so a method built on them needs nothing more for it.
    classification_only: ClassVar[bool] = False
    # Its student is a plain BERT sequence classifier, which another method (FastBERT) can take as its starting point.
    bert_student: ClassVar[bool] = True
    # Its student can leave early at inference: its evaluation sweeps evaluate.exit_speeds.
    exits_early: ClassVar[bool] = False
    # Its student is built by kd.students.build_student, so it copies its layers from student.init_from and takes
    # student.embedding_size; False: the method builds a student of its own kind, and neither applies.
    copies_layers: ClassVar[bool] = True
    # What student.init_from may name for a method that builds its own kind of student (copies_layers False).
    own_kind_init_from: ClassVar[frozenset[str]] = frozenset({"teacher"})
    # The architecture its students belong to. The report compares a student only with baselines of its family
    # and shape: a BiLSTM is not measured against a 3-layer transformer that happens to share its numbers.
    family: ClassVar[str] = "transformer"
    # The task types (stages.config.TaskConfig.task_type) it trains students for: a classifier's methods serve
    # classification and regression (``classification_only`` narrows that), the generation methods seq2seq.
    task_types: ClassVar[frozenset[str]] = frozenset({"classification", "regression"})

    def __init__(self, params: MethodParams | Mapping[str, Any] | None = None):
        if params is None or isinstance(params, Mapping):
            params = self.Params.model_validate(dict(params or {}))
        self.params = params
        # The student's own vocabulary, once ``student_tokenizer`` has built it, or as the pipeline hands it over
        # (see ``vocabulary_key``); ``build_student`` sizes the student's embedding table by it.
        self.vocabulary: PreTrainedTokenizerBase | None = None

    @classmethod
    def reads_teacher_logits(cls) -> bool:
        """Whether the loss reads the teacher's logits (cached, or online), so that an ensemble's averaged soft
        labels can stand in for them."""
        return "logits" in cls.cached_signals | cls.online_signals

    @classmethod
    def teacher_signals(cls) -> Literal["online", "cached", "none"]:
        """How the loss reads the teacher, as summaries and the report's cost table show it: computed in each step,
        read from the prepared Parquet, or not at all."""
        return "online" if cls.online_signals else "cached" if cls.cached_signals else "none"

    def ensemble_temperature(self) -> float:
        """The temperature T at which an ensemble's probabilities are averaged for this student, so that the
        softmax(z / T) its loss forms from the averaged logits is exactly the averaged distribution
        (kd.ensemble): its loss's T, 1 for a loss without one."""
        return 1.0

    def reads_mlm_teacher(self) -> bool:
        """Whether the student takes the head of the pipeline's masked-LM teacher (stage mlm_teacher), which the
        pipeline then hands over as ``params.mlm_head``."""
        return False

    def layer_matches(self, n_teacher: int, n_student: int) -> list[LayerMatch]:
        """The layer-to-layer terms of the loss for these depths (kd.layer_maps); checked against the teacher's
        depth before any Ray work."""
        return []

    def problems(self, where: str, spec: Any, experiment: Any) -> list[str]:
        """What else is wrong with this student entry (``spec``, a ``stages.config.StudentBase``) in
        ``experiment`` (a ``pipeline.config.Experiment``), one message per problem, each starting with ``where``
        (e.g. ``students[1] (fast)``); called when the experiment is validated, before any model is read."""
        return []

    def is_baseline(self) -> bool:
        """Whether this student learns from gold labels alone, as a user without a teacher would train it: the
        report measures every student of its family and shape against such a student."""
        return False

    @property
    def needs_teacher_online(self) -> bool:
        return bool(self.online_signals)

    @property
    def uses_teacher(self) -> bool:
        return bool(self.cached_signals or self.online_signals)

    def resolve_shape(self, shape: StudentShape) -> StudentShape:
        """The shape with ``init`` filled in when the experiment leaves it out: the method's default over the
        teacher's (or its pre-trained checkpoint's) layers; from any other model, its layers in order (uniform),
        since the method's choice was made for the teacher's depth."""
        if shape.init is not None:
            return shape
        default = self.default_init if shape.init_from in NAMED_SOURCES else "uniform"
        return shape.model_copy(update={"init": default})

    def student_tokenizer(self, teacher_tokenizer: PreTrainedTokenizerBase,
                          train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
        """The tokenizer the student trains with and is saved with; called before ``build_student``.

        The teacher's, unless the method builds its own vocabulary from ``train_texts`` (a lazy iterable: a
        method that does not read it costs no pass over the corpus).
        """
        return teacher_tokenizer

    def vocabulary_key(self) -> dict[str, Any] | None:
        """What determines the vocabulary ``student_tokenizer`` trains from the corpus, when that training is not
        reproducible from process to process (WordPiece): the pipeline then trains it once, in a cached stage keyed
        by this, and every training worker sets ``self.vocabulary`` to that one. None: no such stage (the
        teacher's tokenizer, or a vocabulary every worker rebuilds identically)."""
        return None

    def collator(self, student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                 max_length: int, regression: bool, seed: int) -> Collator:
        """What turns rows into training batches; its ``encode`` (plain student inputs) serves evaluation, and its
        ``tokenizer`` is saved with the student."""
        return Collator(student_tokenizer, max_length, regression=regression)

    def starts_from(self) -> str | None:
        """The name of another student of the experiment whose trained model this one is built from (passed to
        ``build_student`` as its ``teacher``); None: the teacher."""
        return None

    def check_teacher(self, shape: StudentShape, teacher_config: PretrainedConfig) -> None:
        """Raise ValueError, naming the field, when a student of ``shape`` cannot be built from a teacher of this
        config; called before any Ray work, with the teacher's config alone."""

    def load_model(self, source: str, num_labels: int, attentions: bool = False) -> PreTrainedModel:
        """The model in folder ``source`` that a student is built from and, online, learns from: the teacher, or
        the checkpoint ``student.init_from`` names. A sequence classifier of ``num_labels`` (with ``attentions``,
        kd.attention's implementation); a method whose teacher is another kind of model loads that."""
        return load_classifier(source, num_labels, attentions=attentions)

    def build_student(self, teacher: PreTrainedModel, shape: StudentShape) -> nn.Module:
        return build_student(teacher, self.resolve_shape(shape))

    def auxiliary_modules(self, student: nn.Module, teacher: PreTrainedModel | None) -> nn.ModuleDict:
        """Extra modules trained with the student (projections) and dropped after training."""
        return nn.ModuleDict()

    def phases(self) -> list[Phase]:
        return [Phase("train")]

    def training_batches(self, chunks: Iterable[Rows], batch_size: int,
                         rng: np.random.Generator) -> Iterator[Rows]:
        """An epoch's shuffled chunks of rows cut into batches of rows (``kd.batching.length_bucketed``: similar
        text lengths together); the collator turns each into tensors."""
        return length_bucketed(chunks, batch_size, rng)

    def dev_metrics(self, model: nn.Module, collator: Collator, rows: Iterable[Rows], regression: bool) -> dict:
        """The student's metrics on the dev rows after each epoch (reported as ``dev_<name>``), among them
        ``selection_metric``'s: the task's metrics of its logits (``task_dev_metrics``)."""
        return task_dev_metrics(model, collator, rows, regression)

    def selection_metric(self, regression: bool) -> str:
        """The dev metric, higher is better, that picks the epoch whose student a run keeps."""
        return task_selection_metric(regression)

    def student_forward(
        self, student: nn.Module, batch: Mapping[str, torch.Tensor], auxiliary: nn.ModuleDict, phase: str
    ) -> Any:
        """The student's training-time call; its result is ``loss``'s ``student_out``.

        Methods that change what the student reads (TextSmooth feeds inputs_embeds) override this; evaluation
        always calls the student on plain ids.
        """
        return student(
            **{k: batch[k] for k in MODEL_INPUTS if k in batch},
            output_hidden_states="hidden_states" in self.student_outputs,
            output_attentions="attentions" in self.student_outputs,
        )

    @abstractmethod
    def loss(
        self,
        student_out: Any,
        teacher_out: TeacherOutputs | None,
        batch: Mapping[str, torch.Tensor],
        auxiliary: nn.ModuleDict,
        phase: str,
    ) -> dict[str, torch.Tensor]:
        """Named loss components and their weighted sum under ``"total"``."""


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    unknown = (cls.cached_signals - CACHED_SIGNALS) | (cls.online_signals - ONLINE_SIGNALS)
    if unknown:
        raise ValueError(f"method {cls.name!r} asks for unknown teacher signals {sorted(unknown)}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
