"""Checks that need the teacher's shape, done before any Ray work: a student deeper than the model its layers come
from, an init list or a layer mapping naming a layer that model does not have, a shape that cannot be built, a
checkpoint that is not a BERT encoder. Reading a config.json is cheap; a hub model's config is fetched once (and is
cached by transformers)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from kd.general import general_matches
from kd.layer_maps import validate_matches
from kd.students import NAMED_SOURCES, check_layer_source, copied_layers, student_config
from pipeline.config import ConfigError, Experiment
from kd.errors import StageError
from stages.cmlm_teacher import check_pair_length
from stages.models import resolve_model_source


def teacher_config(source: str, field: str = "teacher.source") -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(resolve_model_source(source))
    except (OSError, ValueError) as error:
        raise StageError(f"{field} {source!r}: cannot read its config: {error}") from None


def general_configs(exp: Experiment, config: PretrainedConfig) -> tuple[dict[str, PretrainedConfig], list[str]]:
    """The encoder each ``general:`` entry will write, as a config built from the teacher's, and the entries that
    cannot be built or mapped onto the teacher."""
    configs, problems = {}, []
    depth = config.num_hidden_layers
    for index, entry in enumerate(exp.general):
        where = f"general[{index}] ({entry.name})"
        try:
            copied_layers(entry.student, depth)
            configs[entry.name] = student_config(config, entry.student)
            validate_matches(general_matches(entry.losses, depth, entry.student.layers), depth, entry.student.layers)
        except ValueError as error:
            problems.append(f"{where}.student: {error}")
    return configs, problems


def layer_source_config(spec, where: str, config: PretrainedConfig,
                        general: dict[str, PretrainedConfig]) -> PretrainedConfig | None:
    """The config of the model a student's layers come from (``student.init_from``); None when it is a general
    distillation that cannot be built (already a problem of its own)."""
    init_from = spec.student.init_from
    if init_from in NAMED_SOURCES:
        return config
    if spec.student.general_source is not None:
        return general.get(spec.student.general_source)
    source = teacher_config(init_from, f"{where}.student.init_from")
    check_layer_source(source, f"{where}.student.init_from {init_from!r}")
    return source


def check_students_fit_teacher(exp: Experiment) -> None:
    config = teacher_config(exp.teacher.source)
    for index, member in enumerate(exp.ensemble.teachers if exp.ensemble else []):
        teacher_config(member.source, f"ensemble.teachers[{index}].source")  # readable before any Ray work
    depth = config.num_hidden_layers
    general, problems = general_configs(exp, config)
    if exp.task.task_type == "seq2seq":
        try:
            check_pair_length(resolve_model_source(exp.teacher.source), exp.cmlm.max_source_length,
                              exp.cmlm.max_target_length)
        except StageError as error:
            problems.append(f"cmlm: {error}")
    for index, spec in enumerate(exp.students):
        where = f"students[{index}] ({spec.name})"
        layers = spec.student.layers
        method = spec.method_object()
        try:
            source = layer_source_config(spec, where, config, general)
            if source is None:
                continue
            source_depth = source.num_hidden_layers
            if layers > source_depth:
                owner = "the teacher's" if source is config else f"{spec.student.init_from}'s"
                problems.append(f"{where}.student.layers: {layers} is deeper than {owner} {source_depth} layers")
                continue
            copied_layers(method.resolve_shape(spec.student), source_depth)
            if method.copies_layers:  # the others build a student of their own kind from the shape
                student_config(source, spec.student)
            method.check_teacher(spec.student, config)
            validate_matches(method.layer_matches(depth, layers), depth, layers)
        except ValueError as error:
            problems.append(f"{where}: {error}")
    if problems:
        raise ConfigError("the students do not fit the teacher:\n" + "\n".join(f"  {p}" for p in problems))
