"""Tang et al. (2019): distil BERT into a BiLSTM by regressing its logits on a (transfer) corpus."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from transformers import PreTrainedModel

from kd.bilstm import BiLSTMConfig, BiLSTMForSequenceClassification, embeddings_from_teacher
from kd.losses import hard_cross_entropy, logit_mse
from kd.methods.base import Method, MethodParams, register_method
from kd.students import StudentShape

TANG_HIDDEN_SIZE = 300


class BiLSTMParams(MethodParams):
    # α = 1 by default: Tang et al. distil on the augmented transfer set, whose synthetic sentences carry no
    # gold label, so the logit regression alone is their transfer-set objective. α < 1 mixes in gold-label CE
    # and then needs labels in every batch.
    alpha: float = Field(default=1.0, ge=0, le=1, description="Weight of the logit MSE; 1 − α goes to gold-label CE.")
    embeddings: Literal["teacher", "random"] = Field(
        default="teacher", description="Start from the teacher's word embeddings (its width), or at random."
    )
    embedding_dim: int = Field(default=300, ge=1, description="Embedding width when embeddings='random'.")
    mlp_hidden: int = Field(default=400, ge=1, description="Units of the MLP's hidden layer.")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    pair: bool = Field(default=False, description="Sentence-pair task: a siamese encoder and [h1, h2, h1∘h2, |h1−h2|].")


@register_method
class BiLSTMDistillation(Method):
    """L = α · Σ_c (z_s,c − z_t,c)² + (1 − α) · CE(z_s, y), averaged over the batch, from cached teacher logits.

    The student reads the teacher's tokenisation (it shares its vocabulary), so the same collated batches serve.
    ``shape.hidden_size`` is the LSTM width per direction (Tang et al.: 300), ``shape.layers`` its depth (1).
    """

    name = "bilstm"
    Params = BiLSTMParams
    cached_signals = frozenset({"logits"})

    def build_student(self, teacher: PreTrainedModel, shape: StudentShape) -> BiLSTMForSequenceClassification:
        p = self.params
        teacher_embeddings = teacher.get_input_embeddings().weight
        config = BiLSTMConfig(
            vocab_size=teacher_embeddings.shape[0],
            embedding_dim=teacher_embeddings.shape[1] if p.embeddings == "teacher" else p.embedding_dim,
            hidden_size=shape.hidden_size or TANG_HIDDEN_SIZE,
            num_layers=shape.layers,
            mlp_hidden=p.mlp_hidden,
            dropout=p.dropout,
            pad_token_id=teacher.config.pad_token_id,
            pair=p.pair,
            num_labels=teacher.config.num_labels,
            id2label=teacher.config.id2label,
            label2id=teacher.config.label2id,
        )
        student = BiLSTMForSequenceClassification(config)
        if p.embeddings == "teacher":
            embeddings_from_teacher(student, teacher)
        return student

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        alpha = self.params.alpha
        mse = logit_mse(student_out.logits, teacher_out.logits)
        if alpha == 1:
            return {"mse": mse, "total": mse}
        hard = hard_cross_entropy(student_out.logits, batch["labels"])
        return {"mse": mse, "ce": hard, "total": alpha * mse + (1 - alpha) * hard}
