"""BERT-PKD (Sun et al., 2019): patient knowledge distillation from the teacher's intermediate [CLS] states."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd.layer_maps import LayerMatch, expand_strategy
from kd.losses import get_loss, hard_cross_entropy, kl_divergence
from kd.methods.base import Method, MethodParams, register_method
from kd.projections import width_projections


class PKDParams(MethodParams):
    temperature: float = Field(default=10.0, gt=0, description="Softmax temperature T; the paper searches {5, 10, 20}.")
    alpha: float = Field(default=0.5, ge=0, le=1,
                         description="Weight of the soft-target term; 1 − α goes to gold labels.")
    # The patient term is a mean over the d features of the squared difference of unit vectors, so each layer adds
    # at most 4/d, and far less for a student started from the teacher's own layers: a large β, 100 from the
    # paper's grid {10, 100, 500, 1000}, keeps that term on the scale of the cross-entropy ones rather than drowned
    # by them. β was tuned for this mean, the reference implementation's F.mse_loss, not for a sum over features.
    beta: float = Field(default=100.0, ge=0, description="Weight β of the patient [CLS] loss.")
    strategy: Literal["skip", "last"] = Field(default="skip", description="PKD-skip or PKD-last layer pairing.")


@register_method
class PKD(Method):
    """L = (1 − α) · CE(z_s, y) + α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))
    + β · Σ_j (1/d) ‖ h_s,j W / ‖h_s,j W‖ − h_t,m(j) / ‖h_t,m(j)‖ ‖²

    h are [CLS] vectors: h_s,j of student layer j = 1..M−1 (the top layer is left to the prediction loss), h_t,m(j) of
    teacher layer m(j): every k-th layer (PKD-skip, k = N/M) or the last ones (PKD-last). W maps the student's width to
    the teacher's, the identity when they match (the paper's students share the teacher's width); d is the teacher's
    width. The 1/d (a mean over features, averaged over the batch) is the reference implementation's scale, which
    its β was tuned for. The student starts from the teacher's first M layers.
    """

    name = "pkd"
    Params = PKDParams
    online_signals = frozenset({"hidden_states", "logits"})
    student_outputs = frozenset({"hidden_states"})
    default_init = "bottom"

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def layer_matches(self, n_teacher: int, n_student: int) -> list[LayerMatch]:
        return expand_strategy(self.params.strategy, n_teacher, n_student, feature="cls", loss="normalized_mse",
                               include_last=False)

    def auxiliary_modules(self, student, teacher):
        return width_projections(student, teacher, ["cls"])

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        p = self.params
        patient = student_out.logits.new_zeros(())
        matches = self.layer_matches(len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1)
        for match in matches:
            student_cls = auxiliary["cls"](student_out.hidden_states[match.student_layer][:, 0])
            teacher_cls = teacher_out.hidden_states[match.teacher_layer][:, 0]
            patient = patient + match.weight * get_loss(match.loss)(student_cls, teacher_cls)
        soft = kl_divergence(student_out.logits, teacher_out.logits, p.temperature)
        hard = hard_cross_entropy(student_out.logits, batch["labels"])
        total = (1 - p.alpha) * hard + p.alpha * soft + p.beta * patient
        return {"ce": hard, "kd": soft, "patient": patient, "total": total}
