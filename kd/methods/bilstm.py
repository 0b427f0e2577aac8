"""Tang et al. (2019): distil BERT into a BiLSTM by regressing its logits on a (transfer) corpus."""

from __future__ import annotations

from typing import Iterable, Literal

from pydantic import Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd.models.bilstm import BiLSTMConfig, BiLSTMForSequenceClassification, build_vocab, embeddings_from_teacher
from kd.losses import hard_cross_entropy, logit_mse
from kd.methods.base import Method, MethodParams, register_method
from kd.students import StudentShape

TANG_HIDDEN_SIZE = 300


class BiLSTMParams(MethodParams):
    # α = 1 by default: Tang et al. distil on the augmented transfer set, whose synthetic sentences carry no
    # gold label, so the logit regression alone is their transfer-set objective. α < 1 mixes in gold-label CE,
    # which only the original sentences contribute to (augmented rows are labelled NO_LABEL).
    alpha: float = Field(default=1.0, ge=0, le=1, description="Weight of the logit MSE; 1 − α goes to gold-label CE.")
    embeddings: Literal["teacher", "random"] = Field(
        default="teacher", description="Start from the teacher's word embeddings (its width), or at random."
    )
    embedding_dim: int = Field(default=300, ge=1, description="Embedding width when embeddings='random'.")
    vocabulary: Literal["teacher", "corpus"] = Field(
        default="teacher", description="The teacher's tokenizer (WordPiece), or a word-level vocabulary built from "
        "the student's training corpus (kd.models.bilstm.build_vocab), saved with the student.")
    min_freq: int = Field(default=1, ge=1, description="vocabulary='corpus': words seen fewer times become [UNK].")
    max_vocab: int | None = Field(default=None, ge=6, description="vocabulary='corpus': at most this many entries.")
    mlp_hidden: int = Field(default=400, ge=1, description="Units of the MLP's hidden layer.")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    pair: bool = Field(default=False, description="Sentence-pair task: a siamese encoder and [h1, h2, h1∘h2, |h1−h2|].")

    @model_validator(mode="after")
    def _embeddings_fit_the_vocabulary(self) -> "BiLSTMParams":
        if self.vocabulary == "corpus" and self.embeddings == "teacher":
            raise ValueError("the teacher's embeddings index the teacher's vocabulary; with vocabulary: corpus "
                             "use embeddings: random")
        return self


@register_method
class BiLSTMDistillation(Method):
    """L = α · Σ_c (z_s,c − z_t,c)² + (1 − α) · CE(z_s, y), averaged over the batch, from cached teacher logits.

    The student reads the teacher's tokenisation (it shares its vocabulary and can start from its word
    embeddings), or, with ``vocabulary: corpus``, its own word-level vocabulary, which ``student_tokenizer``
    builds and training saves next to the student. The teacher's soft labels come from text, so they serve
    either way. ``shape.hidden_size`` is the LSTM width per direction (Tang et al.: 300), ``shape.layers`` its
    depth (1). It trains on the augmented transfer corpus unless the student entry says ``data: task``.
    """

    name = "bilstm"
    Params = BiLSTMParams
    cached_signals = frozenset({"logits"})
    default_data = "augmented"
    bert_student = False
    copies_layers = False
    family = "bilstm"

    def is_baseline(self) -> bool:
        # α = 0 is gold-label CE alone: the BiLSTM a user would train without a teacher, the BiLSTM students'
        # baseline (the teacher's logits are still read, and weighted 0).
        return self.params.alpha == 0

    def student_tokenizer(self, teacher_tokenizer: PreTrainedTokenizerBase,
                          train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
        p = self.params
        if p.vocabulary == "teacher":
            return teacher_tokenizer
        self.vocabulary = build_vocab(train_texts, min_freq=p.min_freq, max_size=p.max_vocab)
        return self.vocabulary

    def build_student(self, teacher: PreTrainedModel, shape: StudentShape) -> BiLSTMForSequenceClassification:
        p = self.params
        teacher_embeddings = teacher.get_input_embeddings().weight
        if p.vocabulary == "corpus":
            if self.vocabulary is None:
                raise ValueError("vocabulary: corpus needs student_tokenizer to build the vocabulary first")
            vocab_size, pad_token_id = len(self.vocabulary), self.vocabulary.pad_token_id
        else:
            vocab_size, pad_token_id = teacher_embeddings.shape[0], teacher.config.pad_token_id
        config = BiLSTMConfig(
            vocab_size=vocab_size,
            embedding_dim=teacher_embeddings.shape[1] if p.embeddings == "teacher" else p.embedding_dim,
            hidden_size=shape.hidden_size or TANG_HIDDEN_SIZE,
            num_layers=shape.layers,
            mlp_hidden=p.mlp_hidden,
            dropout=p.dropout,
            pad_token_id=pad_token_id,
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
