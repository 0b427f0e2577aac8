"""The experiment file: one YAML document, validated here before any Ray work starts.

Each student's ``params`` is checked against its method's own schema (the method registry supplies them), so
a typo or an out-of-range value is reported with the path of the field, e.g. ``students[1].params.alpha``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from stages.config import (  # noqa: F401  (the sections are part of this module's public API)
    PACKAGED_TEACHER, RT_SNIPPETS, AugmentConfig, CmlmConfig, CorpusConfig, EnsembleConfig, EvaluateConfig, GeneralEntry,
    LabelConfig, RayConfig, SplitNames, StudentBase, StudentSpec, Strict, TaskConfig, TeacherConfig,
)


class ConfigError(Exception):
    """A config problem, already phrased for the user: one line per bad field."""


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(default=None, description="None: sqlite:///WORKDIR/mlflow.db")
    experiment: str | None = Field(default=None, description="None: the experiment's name.")


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
    cmlm: CmlmConfig = Field(
        default_factory=CmlmConfig, description="Generation tasks (task_type: seq2seq): the C-MLM teacher, the pair "
        "lengths and the top-k readings the cmlm students learn from.")
    general: list[GeneralEntry] = Field(
        default_factory=list, description="General distillations: student encoders distilled on unlabelled text, "
        "which students start from with student.init_from: general:NAME.")
    students: list[StudentSpec] = Field(min_length=1)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, workdir: Path) -> Path:
        return workdir.expanduser().resolve()  # Ray workers run in other folders, maybe on other nodes

    @field_validator("general")
    @classmethod
    def _unique_general_names(cls, entries: list[GeneralEntry]) -> list[GeneralEntry]:
        names = [entry.name for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two general distillations are named {repeated[0]!r}")
        return entries

    def general_entry(self, name: str) -> GeneralEntry:
        return next(entry for entry in self.general if entry.name == name)

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
        """The teacher signals and corpora the students ask for can be made from this experiment, and each
        method's own checks of its entry (``Method.problems``) pass."""
        problems = []
        for index, spec in enumerate(self.students):
            where, method = f"students[{index}] ({spec.name})", spec.method_object()
            if "mlm_topk" in method.cached_signals and self.teacher.mlm is None:
                problems.append(f"{where}: {spec.method} reads the teacher's masked-LM distribution; set teacher.mlm")
            problems += method.problems(where, spec, self)
            if self.task.task_type not in method.task_types:
                problems.append(f"{where}: {spec.method} trains students for {' and '.join(sorted(method.task_types))} "
                                f"tasks, not {self.task.task_type}")
            if not method.copies_layers and (spec.student.init_from not in method.own_kind_init_from
                                             or spec.student.embedding_size):
                accepted = " or ".join(sorted(method.own_kind_init_from))
                problems.append(f"{where}: {spec.method} builds a student of its own kind, which takes no "
                                f"student.embedding_size and student.init_from {accepted} only")
            if spec.data == "augmented" and not (method.cached_signals or method.online_signals):
                problems.append(f"{where}: {spec.method} learns from gold labels only, which augmented rows do not "
                                "have; use data: task")
            if spec.data == "augmented" and self.task.task_type == "regression":
                problems.append(f"{where}: data: augmented needs a classification task (augmented rows are marked "
                                "by the label -1)")
        problems += self._seed_method_problems() + self._general_problems()
        if self.augment.rule == "tinybert" and self.teacher.mlm is None and any(
                spec.data == "augmented" for spec in self.students):
            problems.append("augment.rule: tinybert draws replacements from the masked-LM teacher; set teacher.mlm")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _general_problems(self) -> list[str]:
        """Each ``general:`` entry can be made here, and each student that starts from one fits it."""
        problems = []
        for index, entry in enumerate(self.general):
            where = f"general[{index}] ({entry.name})"
            if (entry.teacher == "mlm" or entry.losses.masked) and self.teacher.mlm is None:
                problems.append(f"{where}: teacher: mlm and the masked-LM losses read the masked-LM teacher; set "
                                "teacher.mlm")
            if entry.corpus.source == "augmented" and self.task.task_type == "regression":
                problems.append(f"{where}: corpus.source: augmented needs a classification task")
            if self.task.task_type == "seq2seq":
                problems.append(f"{where}: a generation task's students start from the C-MLM teacher's or the "
                                "pre-trained checkpoint's layers, never from a general distillation; remove it, or "
                                "run it in an experiment of its own")
        names = {entry.name: entry for entry in self.general}
        for index, spec in enumerate(self.students):
            source = spec.student.general_source
            if source is None:
                continue
            where = f"students[{index}] ({spec.name})"
            if source not in names:
                known = ", ".join(sorted(names)) or "none is defined"
                problems.append(f"{where}: student.init_from names general distillation {source!r}; the "
                                f"experiment's general: entries are {known}")
                continue
            problems += [f"{where}: {problem}" for problem in spec.student.fits_source(names[source].student)]
        return problems

    def _seed_method_problems(self) -> list[str]:
        """Ensembles and task types: what each student asks for exists and fits."""
        problems = []
        for index, spec in enumerate(self.students):
            where, method = f"students[{index}] ({spec.name})", spec.method_object()
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
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
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
