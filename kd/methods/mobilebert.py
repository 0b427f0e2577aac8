"""MobileBERT (Sun et al., 2020): layer-wise feature-map and attention transfer into a bottleneck student, then
prediction distillation."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from kd.attention import SCORES_ATTENTION
from kd.layer_maps import LayerMatch, expand_strategy
from kd.losses import get_loss, register_loss, soft_cross_entropy
from kd.methods.base import Method, Phase, register_method
from kd.methods.tinybert import INTERMEDIATE, PREDICTION, TwoPhaseParams, align_heads
from kd.models.mobilebert import BottleneckBertConfig, BottleneckBertForSequenceClassification
from kd.projections import width_projections
from kd.students import StudentShape

MOBILEBERT_INTER_WIDTH = 128


class MobileBertWeights(BaseModel):
    """Weights of the intermediate-phase terms in its total."""

    model_config = ConfigDict(extra="forbid")

    hidden: float = Field(default=1.0, ge=0)
    attention: float = Field(default=1.0, ge=0)


class MobileBertParams(TwoPhaseParams):
    intra_size: int | None = Field(
        default=None, ge=8, description="Width inside each block; None: the teacher's hidden size.")
    weights: MobileBertWeights = Field(default_factory=MobileBertWeights)


@register_loss("attention_kl")
def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MobileBERT's attention transfer: (1/(h·n)) Σ_heads Σ_queries KL(A_t,q ‖ A_s,q), A [B, heads, n, n] the
    attention probabilities over the keys, taken here from the unmasked scaled scores [B, heads, n, n] both models
    return (kd.attention): softmax over the real keys, as the models' own forward pass weighs them, without its
    attention dropout.

    With different head counts both sides are first averaged over their heads (a mean of distributions is one).
    With a token mask [B, n], padded keys get no probability and padded query rows are left out of the mean.
    0 · log 0 counts as 0, and student probabilities are floored at the smallest normal number so an underflowed
    key gives a large finite term, not −inf · 0.
    """
    student, teacher = (key_probabilities(scores, mask) for scores in (student, teacher))
    student, teacher = align_heads(student, teacher)
    floor = torch.finfo(student.dtype).tiny
    kl = (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(floor).log()).sum(-1)  # [B, heads, n]
    if mask is None:
        return kl.mean()
    weights = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * weights).sum() / weights.sum().clamp_min(1.0)


def key_probabilities(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax of scores [B, heads, n, n] over the real keys of a token mask [B, n] (all keys without one)."""
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


@register_method
class MobileBert(Method):
    """Two phases in one run. Intermediate (feature-map and attention transfer), with g the layer map
    (uniform: g(m) = m · N/M):

        L = Σ_m [ w_h · MSE(H_s,m W, H_t,g(m)) + w_a · (1/h) Σ_i (1/n) Σ_q KL(A_t,g(m),i,q ‖ A_s,m,i,q) ]

    then prediction: L = T² · CE(softmax(z_t/T), softmax(z_s/T)). H are the hidden states (H_s at the student's
    narrow inter-block width, mapped to the teacher's by the one W all layers share), A the attention
    probabilities of head i over the keys for query q, without attention dropout (``attention_kl`` takes them from
    the pre-softmax scores both models return). Padded tokens are left out of every mean.

    Departures from the paper: the teacher is the pipeline's plain fine-tuned BERT, not an inverted-bottleneck
    IB-BERT of the student's inter-block width, so the feature maps are compared through the learned W instead of
    directly; MobileBERT's progressive knowledge transfer (layer l trained alone with layers below it frozen, one
    stage per layer) is replaced by training all mapped layers jointly, as TinyBERT does; and the task-agnostic
    pre-training distillation is replaced by distillation on the task (plus any transfer corpus). The student
    starts at random: at another width nothing of the teacher can be copied into it. With different head
    counts, each side's maps are averaged over its heads.
    """

    name = "mobilebert"
    Params = MobileBertParams
    online_signals = frozenset({"logits", "hidden_states", "attentions"})
    student_outputs = frozenset({"hidden_states", "attentions"})
    default_init = "random"
    bert_student = False
    copies_layers = False

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def build_student(self, teacher: PreTrainedModel, shape: StudentShape) -> BottleneckBertForSequenceClassification:
        shape = self.resolve_shape(shape)
        if shape.init != "random":
            raise ValueError(f"the bottleneck student starts at random; init {shape.init!r} cannot be copied into it")
        t = teacher.config
        intra = self.params.intra_size or t.hidden_size
        config = BottleneckBertConfig(
            vocab_size=t.vocab_size,
            hidden_size=shape.hidden_size or MOBILEBERT_INTER_WIDTH,
            intra_size=intra,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.attention_heads or t.num_attention_heads,
            intermediate_size=shape.intermediate_size or 4 * intra,
            hidden_act=t.hidden_act,
            hidden_dropout_prob=t.hidden_dropout_prob,
            attention_probs_dropout_prob=t.attention_probs_dropout_prob,
            max_position_embeddings=t.max_position_embeddings,
            type_vocab_size=t.type_vocab_size,
            layer_norm_eps=t.layer_norm_eps,
            pad_token_id=t.pad_token_id,
            num_labels=t.num_labels,
            id2label=t.id2label,
            label2id=t.label2id,
            # Its own attention already returns these scores; declaring it makes the pipeline's request for them
            # (set_attn_implementation) a no-op instead of a warning that the model cannot switch implementation.
            attn_implementation=SCORES_ATTENTION,
        )
        return BottleneckBertForSequenceClassification(config)

    def phases(self) -> list[Phase]:
        return [Phase(INTERMEDIATE, epochs=self.params.intermediate_epochs),
                Phase(PREDICTION, epochs=self.params.prediction_epochs)]

    def layer_matches(self, n_teacher: int, n_student: int) -> list[LayerMatch]:
        """A hidden and an attention pair per student layer, by the named strategy."""
        strategy = self.params.strategy
        return [*expand_strategy(strategy, n_teacher, n_student, feature="hidden", loss="mse"),
                *expand_strategy(strategy, n_teacher, n_student, feature="attention", loss="attention_kl")]

    def auxiliary_modules(self, student, teacher):
        return width_projections(student, teacher, ["hidden"])

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        if phase == PREDICTION:
            soft = soft_cross_entropy(student_out.logits, teacher_out.logits, self.params.temperature)
            return {"soft_ce": soft, "total": soft}
        if phase != INTERMEDIATE:
            raise ValueError(f"mobilebert has no phase {phase!r}; its phases are {INTERMEDIATE!r}, {PREDICTION!r}")
        if not teacher_out.attentions:  # sdpa gives None or an empty tuple
            raise ValueError("mobilebert needs the teacher's attention scores: load it with attn_implementation="
                             f"{SCORES_ATTENTION!r} (kd.attention; sdpa returns no attention maps)")
        token_mask = batch.get("attention_mask")
        terms = {feature: student_out.logits.new_zeros(()) for feature in ("hidden", "attention")}
        for match in self.layer_matches(len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1):
            loss = get_loss(match.loss)
            if match.feature == "attention":
                # attentions[i] belongs to block i + 1: the tuple has no embedding entry.
                value = loss(student_out.attentions[match.student_layer - 1],
                             teacher_out.attentions[match.teacher_layer - 1], token_mask)
            else:
                value = loss(auxiliary["hidden"](student_out.hidden_states[match.student_layer]),
                             teacher_out.hidden_states[match.teacher_layer], token_mask)
            terms[match.feature] = terms[match.feature] + match.weight * value
        w = self.params.weights
        return {**terms, "total": w.hidden * terms["hidden"] + w.attention * terms["attention"]}
