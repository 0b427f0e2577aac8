"""Hinton et al. (2015): soft-target distillation from cached teacher logits."""

from __future__ import annotations

from pydantic import Field

from kd.losses import hard_cross_entropy, kl_divergence
from kd.methods.base import Method, MethodParams, register_method


class HintonParams(MethodParams):
    temperature: float = Field(default=4.0, gt=0, description="Softmax temperature T of both distributions.")
    alpha: float = Field(default=0.9, ge=0, le=1, description="Weight of the soft-target term; 1 − α goes to gold labels.")


@register_method
class HintonKD(Method):
    """L = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y), from cached teacher logits."""

    name = "kd"
    Params = HintonParams
    cached_signals = frozenset({"logits"})

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        p = self.params
        soft = kl_divergence(student_out.logits, teacher_out.logits, p.temperature)
        hard = hard_cross_entropy(student_out.logits, batch["labels"])
        return {"kd": soft, "ce": hard, "total": p.alpha * soft + (1 - p.alpha) * hard}

