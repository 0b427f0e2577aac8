"""Linear maps from the student's width to the teacher's, for feature losses between models of different widths.

A projection W (``nn.Linear(d_student, d_teacher)``) exists only when the widths differ, as TinyBERT's W_h and W_e do;
with equal widths the key holds an ``nn.Identity``, so a method always calls ``auxiliary[key](h)`` and a same-width
student trains no extra parameter. The modules go into the method's ``auxiliary_modules`` ModuleDict: trained with
the student, dropped after training.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


def hidden_width(model: nn.Module) -> int:
    return model.config.hidden_size


def projection(student_width: int, teacher_width: int) -> nn.Module:
    """``Linear(student_width, teacher_width)`` when the widths differ, else the identity."""
    if student_width == teacher_width:
        return nn.Identity()
    return nn.Linear(student_width, teacher_width)


def width_projections(student: nn.Module, teacher: nn.Module | None, keys: Iterable[str]) -> nn.ModuleDict:
    """One projection per key, each with its own weights (TinyBERT keeps W_e apart from the W_h all layers share)."""
    if teacher is None:
        raise ValueError("projections to the teacher's width need the teacher model")
    student_width, teacher_width = hidden_width(student), hidden_width(teacher)
    return nn.ModuleDict({key: projection(student_width, teacher_width) for key in keys})
