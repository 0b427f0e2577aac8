"""TextSmooth (Wu et al.): distil into a student that reads smoothed tokens, t̃ = λ·onehot(t) + (1 − λ)·p̃_MLM."""

from __future__ import annotations

from pydantic import Field

from kd.losses import hard_cross_entropy, kl_divergence
from kd.methods.base import Method, MethodParams, register_method
from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS, smoothed_inputs_embeds


class TextSmoothParams(MethodParams):
    lam: float = Field(
        default=0.5, ge=0, le=1, description="λ: weight of the one-hot token; 1 − λ goes to the MLM distribution."
    )
    # T and α default to the Hinton method's, so that kd and textsmooth students differ only in their input.
    temperature: float = Field(default=4.0, gt=0, description="Softmax temperature T of both distributions.")
    alpha: float = Field(default=0.9, ge=0, le=1, description="Weight of the soft-target term; 1 − α goes to gold labels.")


@register_method
class TextSmooth(Method):
    """L = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y), where in training the student
    reads inputs_embeds = t̃ · E (kd.textsmooth) and at inference plain ids.

    The batch carries the teacher's cached logits and its top-k masked-LM distribution per token,
    ``mlm_topk_ids`` [B, L, k] and ``mlm_topk_probs`` [B, L, k], padded to the batch's sequence length. KL and
    soft CE differ by the teacher's entropy, a constant, so they give the student the same gradient; KL reads 0
    at a perfect match.
    """

    name = "textsmooth"
    Params = TextSmoothParams
    cached_signals = frozenset({"logits", "mlm_topk"})
    default_init = "bottom"  # Wu et al. initialise the student from the teacher's first layers

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def student_forward(self, student, batch, auxiliary, phase):
        missing = [key for key in (MLM_TOPK_IDS, MLM_TOPK_PROBS) if key not in batch]
        if missing:
            raise KeyError(f"textsmooth needs the teacher's masked-LM top-k in the batch; missing {missing}")
        embeds = smoothed_inputs_embeds(
            batch["input_ids"], batch[MLM_TOPK_IDS], batch[MLM_TOPK_PROBS],
            student.get_input_embeddings().weight, self.params.lam,
        )
        return student(inputs_embeds=embeds, **{k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch})

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        p = self.params
        soft = kl_divergence(student_out.logits, teacher_out.logits, p.temperature)
        hard = hard_cross_entropy(student_out.logits, batch["labels"])
        return {"kd": soft, "ce": hard, "total": p.alpha * soft + (1 - p.alpha) * hard}
