"""The no-KD baseline: fine-tuning a student on gold labels, also how the pipeline fine-tunes the teacher."""

from __future__ import annotations

from kd.losses import hard_cross_entropy
from kd.methods.base import Method, register_method


@register_method
class FineTune(Method):
    """The no-KD baseline: the same student trained on gold labels alone."""

    name = "finetune"

    def is_baseline(self) -> bool:
        return True

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        hard = hard_cross_entropy(student_out.logits, batch["labels"])
        return {"ce": hard, "total": hard}
