"""Layer mappings as data: which student layer learns from which teacher layer, on what feature, by which loss.

Layer numbers follow the papers and Hugging Face's ``hidden_states`` tuple: 0 is the embedding output and
layer i (1-based) is the output of transformer block i. Named strategies expand to explicit lists.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kd.losses import LOSSES

Feature = Literal["hidden", "attention", "embedding", "cls"]
STRATEGIES = ("uniform", "top", "bottom", "skip", "last", "every_other")
Strategy = Literal["uniform", "top", "bottom", "skip", "last", "every_other"]


class LayerMatch(BaseModel):
    """One (student layer, teacher layer, feature, loss, weight, projection) entry, as in TextBrewer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student_layer: int = Field(ge=0)
    teacher_layer: int = Field(ge=0)
    feature: Feature = "hidden"
    loss: str = "mse"
    weight: float = Field(default=1.0, ge=0)
    projection: bool | None = Field(
        default=None, description="Learn a linear map from student to teacher width; None means 'when widths differ'."
    )

    @field_validator("loss")
    @classmethod
    def _registered_loss(cls, loss: str) -> str:
        # Refused where the mapping is written, not at the first training step that looks the loss up.
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
        return loss


def teacher_layers(strategy: Strategy, n_teacher: int, n_student: int) -> list[int]:
    """The 1-based teacher layer paired with each student layer 1..n_student under a named strategy.

    - uniform: g(m) = m·N/M (TinyBERT), e.g. 12→4 gives 3, 6, 9, 12.
    - top / last: the last M teacher layers. bottom: the first M.
    - skip: every k-th layer, k = N/M (BERT-PKD's PKD-skip), e.g. 12→6 gives 2, 4, ..., 12.
    - every_other: 1, 3, 5, ... (DistilBERT's initialisation).
    """
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot map onto a teacher of {n_teacher} layers")
    if strategy in ("uniform", "skip"):
        if strategy == "skip" and n_teacher % n_student:
            raise ValueError(f"skip needs the teacher depth ({n_teacher}) to be a multiple of the student's ({n_student})")
        return [m * n_teacher // n_student for m in range(1, n_student + 1)]
    if strategy in ("top", "last"):
        return list(range(n_teacher - n_student + 1, n_teacher + 1))
    if strategy == "bottom":
        return list(range(1, n_student + 1))
    if strategy == "every_other":
        if 2 * n_student - 1 > n_teacher:
            raise ValueError(f"every_other needs a teacher of at least {2 * n_student - 1} layers for {n_student}")
        return list(range(1, 2 * n_student, 2))
    raise ValueError(f"unknown layer strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def expand_strategy(
    strategy: Strategy,
    n_teacher: int,
    n_student: int,
    feature: Feature = "hidden",
    loss: str = "mse",
    weight: float = 1.0,
    include_last: bool = True,
) -> list[LayerMatch]:
    """Expand a named strategy to explicit matches. ``include_last=False`` drops the top student layer,
    as BERT-PKD does: that layer is already taught by the prediction loss (PKD-skip 12→6 maps 2, 4, 6, 8, 10)."""
    pairs = list(enumerate(teacher_layers(strategy, n_teacher, n_student), start=1))
    if not include_last:
        pairs = pairs[:-1]
    return [LayerMatch(student_layer=s, teacher_layer=t, feature=feature, loss=loss, weight=weight) for s, t in pairs]


def validate_matches(matches: list[LayerMatch], n_teacher: int, n_student: int) -> None:
    """Refuse a mapping that names a layer past either model's depth."""
    for i, match in enumerate(matches):
        if match.student_layer > n_student:
            raise ValueError(f"layer_map[{i}]: student layer {match.student_layer} is past the student's depth {n_student}")
        if match.teacher_layer > n_teacher:
            raise ValueError(f"layer_map[{i}]: teacher layer {match.teacher_layer} is past the teacher's depth {n_teacher}")
        if match.feature == "attention" and (match.student_layer == 0 or match.teacher_layer == 0):
            raise ValueError(f"layer_map[{i}]: layer 0 is the embedding output and has no attention")
