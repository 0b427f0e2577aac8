"""TinyBERT (Jiao et al., 2020): embedding, attention and hidden-state transfer, then prediction-layer distillation."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kd.attention import SCORES_ATTENTION
from kd.layer_maps import LayerMatch, expand_strategy
from kd.losses import get_loss, soft_cross_entropy
from kd.methods.base import Method, MethodParams, Phase, register_method
from kd.projections import width_projections

INTERMEDIATE, PREDICTION = "intermediate", "prediction"


class TinyBertWeights(BaseModel):
    """Weights of the intermediate-phase terms in its total."""

    model_config = ConfigDict(extra="forbid")

    embedding: float = Field(default=1.0, ge=0)
    attention: float = Field(default=1.0, ge=0)
    hidden: float = Field(default=1.0, ge=0)


class TwoPhaseParams(MethodParams):
    """What TinyBERT and MobileBERT share: layer-to-layer transfer (intermediate phase), then prediction."""

    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature T of the prediction loss.")
    strategy: Literal["uniform", "top", "bottom"] = Field(
        default="uniform", description="Which teacher layer each student layer learns from.")
    intermediate_epochs: int | None = Field(default=None, ge=1, description="None: the student's train.epochs.")
    prediction_epochs: int | None = Field(default=None, ge=1, description="None: the student's train.epochs.")


class TinyBertParams(TwoPhaseParams):
    weights: TinyBertWeights = Field(default_factory=TinyBertWeights)


def pair_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, 1, query, key) weights: 1 where both the query and the key token are real."""
    if attention_mask is None:
        return None
    return attention_mask[:, None, :, None] * attention_mask[:, None, None, :]


def align_heads(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention maps (batch, heads, query, key) made comparable: with different head counts both are averaged
    over their heads, since no head of one model corresponds to a head of the other."""
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def intermediate_terms(matches: list[LayerMatch], student_out, teacher_out, auxiliary: torch.nn.ModuleDict,
                       token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """TinyBERT's layer-to-layer terms, summed per feature (``embedding``, ``attention``, ``hidden``) over
    ``matches``: what the intermediate phase and general distillation (``kd.general``) both minimise.
    ``auxiliary`` holds the ``embedding`` and ``hidden`` width projections; padded tokens are left out."""
    if not student_out.attentions or not teacher_out.attentions:  # sdpa gives None or an empty tuple
        if any(match.feature == "attention" for match in matches):
            raise ValueError("the attention terms need the attention scores of student and teacher: use "
                             f"attn_implementation={SCORES_ATTENTION!r} (kd.attention) for both; sdpa returns no "
                             "attention maps")
    attention_mask = pair_mask(token_mask)
    terms = {feature: teacher_out.hidden_states[0].new_zeros(()) for feature in ("embedding", "attention", "hidden")}
    for match in matches:
        loss = get_loss(match.loss)
        if match.feature == "attention":
            # attentions[i] belongs to block i + 1: the tuple has no embedding entry.
            student_att, teacher_att = align_heads(student_out.attentions[match.student_layer - 1],
                                                   teacher_out.attentions[match.teacher_layer - 1])
            value = loss(student_att, teacher_att, attention_mask)
        else:
            student_hidden = auxiliary[match.feature](student_out.hidden_states[match.student_layer])
            value = loss(student_hidden, teacher_out.hidden_states[match.teacher_layer], token_mask)
        terms[match.feature] = terms[match.feature] + match.weight * value
    return terms


@register_method
class TinyBert(Method):
    """Two phases in one run. Intermediate, with g the layer map (uniform: g(m) = m · N/M):

        L = w_e · MSE(E_s W_e, E_t) + Σ_m [ w_a · (1/h) Σ_i MSE(A_s,m,i, A_t,g(m),i) + w_h · MSE(H_s,m W_h, H_t,g(m)) ]

    then prediction: L = T² · CE(softmax(z_t/T), softmax(z_s/T)). E are the embedding outputs, H the hidden states,
    A the attention maps of head i: as in the paper, the pre-softmax scores QKᵀ/√d, which kd.attention's
    implementation (``SCORES_ATTENTION``) returns free of attention dropout. W_e and the one W_h all layers share
    map the student's width to the teacher's (identities when the widths match). Padded tokens are left out of
    every mean, the attention MSE's included: it runs over pairs of real query and key tokens.

    Departure from the paper: when student and teacher have different head counts, each side's maps are averaged
    over its heads before the MSE. The paper's data augmentation is a separate transfer corpus, not part of this
    loss.
    """

    name = "tinybert"
    Params = TinyBertParams
    online_signals = frozenset({"logits", "hidden_states", "attentions"})
    student_outputs = frozenset({"hidden_states", "attentions"})
    default_init = "uniform"

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def phases(self) -> list[Phase]:
        return [Phase(INTERMEDIATE, epochs=self.params.intermediate_epochs),
                Phase(PREDICTION, epochs=self.params.prediction_epochs)]

    def layer_matches(self, n_teacher: int, n_student: int) -> list[LayerMatch]:
        """The embedding pair (0, 0), then an attention and a hidden pair per student layer."""
        strategy = self.params.strategy
        return [
            LayerMatch(student_layer=0, teacher_layer=0, feature="embedding", loss="mse"),
            *expand_strategy(strategy, n_teacher, n_student, feature="attention", loss="mse"),
            *expand_strategy(strategy, n_teacher, n_student, feature="hidden", loss="mse"),
        ]

    def auxiliary_modules(self, student, teacher):
        return width_projections(student, teacher, ["embedding", "hidden"])

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        if phase == PREDICTION:
            soft = soft_cross_entropy(student_out.logits, teacher_out.logits, self.params.temperature)
            return {"soft_ce": soft, "total": soft}
        if phase != INTERMEDIATE:
            raise ValueError(f"tinybert has no phase {phase!r}; its phases are {INTERMEDIATE!r}, {PREDICTION!r}")
        matches = self.layer_matches(len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1)
        terms = intermediate_terms(matches, student_out, teacher_out, auxiliary, batch.get("attention_mask"))
        w = self.params.weights
        total = w.embedding * terms["embedding"] + w.attention * terms["attention"] + w.hidden * terms["hidden"]
        return {**terms, "total": total}
