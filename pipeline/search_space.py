"""Search spaces: one YAML file per method in ``tune_spaces/``, validated against the method's schema before
Tune starts.

    metric: dev_accuracy        # any metric a trial reports; dev_<task metric> by default
    mode: max
    space:
      params.temperature: {loguniform: [1.0, 20.0]}
      params.alpha: {uniform: [0.1, 1.0]}
      student.init: {choice: [uniform, top, bottom]}
      train.learning_rate: {loguniform: [2.0e-5, 3.0e-4]}

Keys are dotted paths into a student entry of the experiment file (``params``, ``student``, ``train``).
Distributions: uniform [low, high], loguniform [low, high], randint [low, high) , choice [values], grid [values].
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import ConfigError, StudentSpec, describe_errors

SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"
KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
SEARCHABLE_SECTIONS = ("params", "student", "train")


class Distribution(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    values: tuple[Any, ...]

    @model_validator(mode="after")
    def _well_formed(self) -> "Distribution":
        if self.kind in ("uniform", "loguniform", "randint"):
            if len(self.values) != 2 or not all(isinstance(v, (int, float)) for v in self.values):
                raise ValueError(f"{self.kind} takes [low, high]")
            low, high = self.values
            if not low < high:
                raise ValueError(f"{self.kind} needs low < high, got {list(self.values)}")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError("loguniform needs low > 0")
        elif not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        return self

    def candidates(self) -> list[Any]:
        """Values that bound what a sample can be: checked against the schema before any trial runs."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def to_tune(self):
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "randint":
            return tune.randint(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str | None = None
    mode: Literal["max", "min"] = "max"
    space: dict[str, Distribution] = Field(min_length=1)
    source: str = "search space"

    def param_space(self) -> dict[str, Any]:
        return {key: distribution.to_tune() for key, distribution in self.space.items()}


def set_path(document: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = document
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def apply_sample(base_student: dict, sample: dict[str, Any]) -> dict:
    """A student entry with a trial's sampled values written into it."""
    student = copy.deepcopy(base_student)
    for dotted, value in sample.items():
        set_path(student, dotted, value)
    return student


def _parse_distribution(key: str, raw: Any, source: str) -> Distribution:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{source}: space.{key}: write one distribution, e.g. {{uniform: [0.1, 1.0]}}")
    (kind, values), = raw.items()
    if kind not in KINDS:
        raise ConfigError(f"{source}: space.{key}: unknown distribution {kind!r}; use one of {', '.join(KINDS)}")
    try:
        return Distribution(kind=kind, values=tuple(values) if isinstance(values, (list, tuple)) else (values,))
    except ValidationError as error:
        raise ConfigError(f"{source}: space.{key}: {error.errors(include_url=False)[0]['msg']}") from None


def validate_space(space: SearchSpace, base_student: dict) -> None:
    """Every key must name a field of the student entry, and every bound or choice must pass its validation."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(StudentSpec)
    for key, distribution in space.space.items():
        if key.split(".")[0] not in SEARCHABLE_SECTIONS or "." not in key:
            raise ConfigError(f"{space.source}: space.{key}: keys start with one of {', '.join(SEARCHABLE_SECTIONS)} "
                              "and name a field, e.g. params.temperature")
        for value in distribution.candidates():
            try:
                adapter.validate_python(apply_sample(base_student, {key: value}))
            except ValidationError as error:
                details = describe_errors(error).strip()
                raise ConfigError(f"{space.source}: space.{key} = {value!r} does not fit the "
                                  f"{base_student['method']!r} student: {details}") from None


def load_space(method: str, base_student: dict, path: Path | None = None) -> SearchSpace:
    path = path or SPACES_DIR / f"{method}.yaml"
    if not path.exists():
        raise ConfigError(f"no search space for method {method!r}: create {path}")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    unknown = set(document) - {"metric", "mode", "space"}
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {sorted(unknown)}; a space file has metric, mode and space")
    raw_space = document.get("space") or {}
    if not isinstance(raw_space, dict) or not raw_space:
        raise ConfigError(f"{path}: space must map field paths to distributions")
    space = SearchSpace(
        metric=document.get("metric"), mode=document.get("mode", "max"), source=str(path),
        space={key: _parse_distribution(key, raw, str(path)) for key, raw in raw_space.items()},
    )
    validate_space(space, base_student)
    return space
