"""Students built from a teacher: fewer layers, optionally narrower, initialised from chosen teacher layers."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel

from kd.layer_maps import Strategy, teacher_layers

InitStrategy = Literal["uniform", "top", "bottom", "skip", "last", "every_other", "random"]


class StudentShape(BaseModel):
    """The student's architecture and where its weights come from."""

    model_config = ConfigDict(extra="forbid")

    layers: int = Field(ge=1, description="Transformer blocks in the student.")
    hidden_size: int | None = Field(default=None, ge=8, description="None keeps the teacher's width.")
    attention_heads: int | None = Field(default=None, ge=1, description="None: keep the teacher's head size (64 or its own).")
    intermediate_size: int | None = Field(default=None, ge=8, description="None: 4 × hidden_size.")
    init_from: Literal["teacher", "pretrained"] = Field(
        default="teacher",
        description="Where the copied layers come from: the fine-tuned teacher (its pooler and classifier too), or "
        "the pre-trained checkpoint the teacher was fine-tuned from, with a fresh classifier: what a user would "
        "fine-tune without a teacher.",
    )
    init: InitStrategy | list[int] | None = Field(
        default=None,
        description="Teacher layers (1-based) to copy into the student, a named strategy, or 'random'; "
        "None takes the method's own choice (DistilBERT every_other, PKD and TextSmooth bottom, else uniform).",
    )

    @model_validator(mode="after")
    def _explicit_init_matches_depth(self) -> "StudentShape":
        if isinstance(self.init, list) and len(self.init) != self.layers:
            raise ValueError(f"init lists {len(self.init)} teacher layers for a student of {self.layers} layers")
        return self


def student_config(teacher_config: BertConfig, shape: StudentShape) -> BertConfig:
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
    chosen blocks are copied; a narrower student can only start at random (nothing to copy into it)."""
    config = student_config(teacher.config, shape)
    student = BertForSequenceClassification(config)
    layers = copied_layers(shape, teacher.config.num_hidden_layers)
    same_width = config.hidden_size == teacher.config.hidden_size and (
        config.intermediate_size == teacher.config.intermediate_size
        and config.num_attention_heads == teacher.config.num_attention_heads
    )
    if layers is None or not same_width:
        return student
    teacher_bert = teacher.bert
    with torch.no_grad():
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
