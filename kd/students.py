"""Students built from a teacher: fewer layers, optionally narrower, initialised from chosen teacher layers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import BertConfig, BertForSequenceClassification, PretrainedConfig, PreTrainedModel

from kd.layer_maps import Strategy, teacher_layers
from kd.models.factorised import FactorisedBertConfig, FactorisedBertForSequenceClassification

InitStrategy = Literal["uniform", "top", "bottom", "skip", "last", "every_other", "random"]
GENERAL_PREFIX = "general:"
# The sources a student's layers can come from that are not a checkpoint's name.
NAMED_SOURCES = ("teacher", "pretrained")
# The fields a student from a checkpoint may leave out (to keep the checkpoint's) or repeat, but not change.
INHERITED_FIELDS = ("hidden_size", "embedding_size", "attention_heads", "intermediate_size")
LAYER_SOURCE_TYPES = ("bert", FactorisedBertConfig.model_type)


class StudentShape(BaseModel):
    """The student's architecture and where its weights come from."""

    model_config = ConfigDict(extra="forbid")

    layers: int = Field(ge=1, description="Transformer blocks in the student.")
    hidden_size: int | None = Field(
        default=None, ge=8, description="None keeps the width of the model the layers come from (init_from).")
    embedding_size: int | None = Field(
        default=None, ge=8,
        description="Width E of the embedding tables, lifted to hidden_size by one linear map (ALBERT's factorised "
        "embeddings, kd.models.factorised): the word table shrinks from vocab × hidden_size to vocab × E. The "
        "student's hidden size: a plain BERT's embeddings; None: the teacher's (a plain BERT's for a BERT teacher).",
    )
    attention_heads: int | None = Field(default=None, ge=1, description="None: keep the teacher's head size (64 or its own).")
    intermediate_size: int | None = Field(default=None, ge=8, description="None: 4 × hidden_size.")
    init_from: str = Field(
        default="teacher",
        description="Where the copied layers come from: 'teacher', the fine-tuned teacher (its pooler and classifier "
        "too); 'pretrained', the checkpoint the teacher was fine-tuned from, with a fresh classifier: what a user "
        "would fine-tune without a teacher; 'general:NAME', the encoder of this experiment's general distillation "
        "NAME; or any checkpoint: a local folder, 'package:<module>/<folder>', or a hub name. From a checkpoint, "
        "the widths left out are the checkpoint's.",
    )
    init: InitStrategy | list[int] | None = Field(
        default=None,
        description="Layers (1-based) of the init_from model to copy into the student, a named strategy, or "
        "'random'; None takes the method's own choice from the teacher (DistilBERT every_other, PKD and "
        "TextSmooth bottom, else uniform) and uniform from any other model.",
    )

    @model_validator(mode="after")
    def _explicit_init_matches_depth(self) -> "StudentShape":
        if isinstance(self.init, list) and len(self.init) != self.layers:
            raise ValueError(f"init lists {len(self.init)} teacher layers for a student of {self.layers} layers")
        return self

    @model_validator(mode="after")
    def _init_from_is_a_source(self) -> "StudentShape":
        if self.init_from.startswith(GENERAL_PREFIX) and not self.general_source:
            raise ValueError("init_from: general:NAME needs the name of one of the experiment's general: entries")
        if self.init_from.startswith((".", "/", "~")) and not Path(self.init_from).expanduser().is_dir():
            raise ValueError(f"init_from {self.init_from!r} is not a folder")
        return self

    @property
    def general_source(self) -> str | None:
        """The general distillation this student starts from (``init_from: general:NAME``), if any."""
        if self.init_from.startswith(GENERAL_PREFIX):
            return self.init_from[len(GENERAL_PREFIX):]
        return None

    def fits_source(self, source: "StudentShape") -> list[str]:
        """What stops this student from starting from a model of shape ``source``: more layers than it has, or a
        width it does not have (a field left out takes the source's)."""
        problems = []
        if self.layers > source.layers:
            problems.append(f"{self.layers} layers, but {self.init_from} has {source.layers}")
        for name in INHERITED_FIELDS:
            wanted, given = getattr(self, name), getattr(source, name)
            if wanted is not None and wanted != given:
                has = given if given is not None else "the teacher's"
                problems.append(f"{name} {wanted}, but {self.init_from} has {has}; leave {name} out to take its own")
        return problems


def check_layer_source(config: PretrainedConfig, name: str) -> None:
    """Raise ValueError unless ``config`` is a BERT encoder's, the models whose layers a student copies."""
    if config.model_type not in LAYER_SOURCE_TYPES:
        raise ValueError(f"{name} is a {config.model_type!r} model, not a BERT encoder "
                         f"({', '.join(LAYER_SOURCE_TYPES)}) whose layers a student can copy")


def student_config(teacher_config: BertConfig, shape: StudentShape) -> BertConfig:
    """The teacher's config at the student's depth and widths; a ``FactorisedBertConfig`` when ``embedding_size``
    is set and differs from the student's hidden size."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = shape.layers
    if shape.hidden_size is not None and shape.hidden_size != teacher_config.hidden_size:
        head_dim = teacher_config.hidden_size // teacher_config.num_attention_heads
        heads = shape.attention_heads or max(1, shape.hidden_size // head_dim)
        if shape.hidden_size % heads:
            raise ValueError(f"hidden_size {shape.hidden_size} is not divisible by {heads} attention heads")
        config.hidden_size = shape.hidden_size
        config.num_attention_heads = heads
        config.intermediate_size = shape.intermediate_size or 4 * shape.hidden_size
    else:
        if shape.attention_heads is not None:
            config.num_attention_heads = shape.attention_heads
        if shape.intermediate_size is not None:
            config.intermediate_size = shape.intermediate_size
    if shape.embedding_size is not None:
        # The settings as keywords of another config class; model_type would shadow the class's own.
        settings = {key: value for key, value in config.to_dict().items()
                    if key not in ("model_type", "architectures", "transformers_version", "embedding_size")}
        if shape.embedding_size != config.hidden_size:
            config = FactorisedBertConfig(**settings, embedding_size=shape.embedding_size,
                                          attn_implementation=config._attn_implementation)
        elif isinstance(config, FactorisedBertConfig):  # a factorised teacher, a student asking for plain embeddings
            config = BertConfig(**settings, attn_implementation=config._attn_implementation)
    return config


def copied_layers(shape: StudentShape, n_teacher: int) -> list[int] | None:
    """1-based teacher layers the student starts from, or None for a random start."""
    if shape.init is None:
        raise ValueError("the student's init is unresolved: ask the method (Method.resolve_shape)")
    if shape.init == "random":
        return None
    if isinstance(shape.init, list):
        bad = [layer for layer in shape.init if not 1 <= layer <= n_teacher]
        if bad:
            raise ValueError(f"init names teacher layers {bad}, past the teacher's depth {n_teacher}")
        return list(shape.init)
    strategy: Strategy = shape.init
    return teacher_layers(strategy, n_teacher, shape.layers)


def build_student(teacher: PreTrainedModel, shape: StudentShape) -> BertForSequenceClassification:
    """A BERT classifier of ``shape``. With the teacher's width, embeddings, pooler, classifier and the
    chosen blocks are copied; a narrower student can only start at random (nothing to copy into it).

    With ``embedding_size`` (and a hidden size other than it) the student is a
    ``FactorisedBertForSequenceClassification`` (a ``BertForSequenceClassification`` subclass). Its embeddings (the E-wide tables, their LayerNorm, the lift to
    the hidden width) always start at random: none of the teacher's fits them. Its blocks, pooler and classifier are
    BERT's at the hidden width, so with the teacher's block width they are copied as for a plain student."""
    config = student_config(teacher.config, shape)
    model_class = (FactorisedBertForSequenceClassification if isinstance(config, FactorisedBertConfig)
                   else BertForSequenceClassification)
    student = model_class(config)
    layers = copied_layers(shape, teacher.config.num_hidden_layers)
    same_width = config.hidden_size == teacher.config.hidden_size and (
        config.intermediate_size == teacher.config.intermediate_size
        and config.num_attention_heads == teacher.config.num_attention_heads
    )
    if layers is None or not same_width:
        return student
    # Embeddings are copied only when the student's are laid out as the teacher's: both plain, or both factorised
    # at the same E (a factorised teacher hands its architecture to a student that names no embedding_size).
    same_embeddings = getattr(config, "embedding_size", None) == getattr(teacher.config, "embedding_size", None)
    teacher_bert = teacher.bert
    with torch.no_grad():
        if same_embeddings:
            student.bert.embeddings.load_state_dict(teacher_bert.embeddings.state_dict())
        for student_index, teacher_layer in enumerate(layers):
            student.bert.encoder.layer[student_index].load_state_dict(
                teacher_bert.encoder.layer[teacher_layer - 1].state_dict()
            )
        if teacher_bert.pooler is not None and student.bert.pooler is not None:
            student.bert.pooler.load_state_dict(teacher_bert.pooler.state_dict())
        if hasattr(teacher, "classifier"):
            student.classifier.load_state_dict(teacher.classifier.state_dict())
    return student


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters in all, in the embedding tables (word, position, token type), in the word table alone, and
    outside the tables: a small BERT's vocabulary dominates its size, so the two parts are counted apart."""
    total = count_parameters(model)
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    embeddings = sum(tables.values())
    return {"params": total, "embedding_params": embeddings,
            "word_embedding_params": model.get_input_embeddings().weight.numel(),
            "non_embedding_params": total - embeddings}
