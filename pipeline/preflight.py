"""Checks that need the teacher's shape, done before any Ray work: a student deeper than the teacher, an init
list or a layer mapping naming a layer the teacher does not have. Reading a config.json is cheap; a hub
teacher's config is fetched once (and is cached by transformers)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from kd.layer_maps import validate_matches
from kd.students import copied_layers
from pipeline.config import ConfigError, Experiment
from kd.errors import StageError
from stages.models import resolve_model_source


def teacher_config(source: str, field: str = "teacher.source") -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(resolve_model_source(source))
    except (OSError, ValueError) as error:
        raise StageError(f"{field} {source!r}: cannot read its config: {error}") from None


def check_students_fit_teacher(exp: Experiment) -> None:
    config = teacher_config(exp.teacher.source)
    for index, member in enumerate(exp.ensemble.teachers if exp.ensemble else []):
        teacher_config(member.source, f"ensemble.teachers[{index}].source")  # readable before any Ray work
    depth = config.num_hidden_layers
    problems = []
    for index, spec in enumerate(exp.students):
        where = f"students[{index}] ({spec.name})"
        layers = spec.student.layers
        if layers > depth:
            problems.append(f"{where}.student.layers: {layers} is deeper than the teacher's {depth} layers")
            continue
        method = spec.method_object()
        try:
            copied_layers(method.resolve_shape(spec.student), depth)
            method.check_teacher(spec.student, config)
            validate_matches(method.layer_matches(depth, layers), depth, layers)
        except ValueError as error:
            problems.append(f"{where}: {error}")
    if problems:
        raise ConfigError("the students do not fit the teacher:\n" + "\n".join(f"  {p}" for p in problems))
