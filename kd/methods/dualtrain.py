"""DualTrain + SharedProj (Zhao et al., 2020): a small-vocabulary, narrow student distilled through mixed-vocabulary
inputs and one projection shared by all layers (kd.models.dualtrain describes the design)."""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from kd.models.dualtrain import (
    STUDENT_ATTENTION_MASK,
    STUDENT_INPUT_IDS,
    STUDENT_TOKEN_TYPE_IDS,
    STUDENT_UNIT_IDS,
    UNIT_IDS,
    DualCollator,
    SharedProjection,
    mixed_inputs_embeds,
    pool_units,
    train_wordpiece,
)
from kd.layer_maps import expand_strategy
from kd.losses import hard_cross_entropy, mean_squared_error, soft_cross_entropy
from kd.methods.base import Method, MethodParams, register_method
from kd.students import StudentShape, build_student


class DualTrainParams(MethodParams):
    vocab_size: int = Field(
        default=5000, ge=32, description="The size the student's WordPiece vocabulary is trained to on the task's "
        "train split, and so the rows of its word-embedding table (the paper's is about 5K; it must be smaller than "
        "the teacher's). The trainer keeps every character it sees, so a tiny size can come out a little larger.")
    p_teacher: float = Field(
        default=0.5, ge=0, le=1, description="Probability that a word is segmented by the teacher's vocabulary in "
        "the student's training input (read by the batch builder, kd.models.dualtrain.dual_batch).")
    # "up" by default: its target, the frozen teacher's states, cannot move; "down" trains the target side too
    # (H_t U), and shrinking U with the student's states lowers that MSE without teaching the student anything.
    direction: Literal["down", "up"] = Field(
        default="up", description="Shared projection: 'down' compares in the student's width, 'up' in the teacher's.")
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature T of the soft cross-entropy.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the soft term; 1 − α goes to gold labels.")
    beta: float = Field(default=1.0, ge=0, description="Weight β of the layer-wise hidden-state MSE.")


@register_method
class DualTrain(Method):
    """L = α · T² · CE(softmax(z_t/T), softmax(z_s/T)) + (1 − α) · CE(z_s, y) + β · Σ_m MSE_units(m),

    with g the uniform layer map (g(m) = m · N/M) and U the one shared projection:

        down: MSE_units(m) = MSE(pool(H_s,m), pool(H_t,g(m)) U)      up: MSE(pool(H_s,m) U, pool(H_t,g(m)))

    where pool averages each side's states over the pieces of every unit ([CLS], words, [SEP]), since the two
    models read different segmentations, and the mean runs over units present on both sides.

    The batch carries the teacher's segmentation under the plain input keys (the frozen teacher reads it online)
    and the student's mixed one under student_* keys with the unit ids of both sides (kd.models.dualtrain.dual_batch);
    the student reads it through E_mixed = [E_s ; E_t P]. The student is a BERT of ``vocab_size`` pieces and
    ``shape.hidden_size`` width (its blocks copied from the teacher when the width is the teacher's, else random);
    at evaluation it reads plain student-vocabulary ids.
    """

    name = "dualtrain"
    Params = DualTrainParams
    online_signals = frozenset({"logits", "hidden_states"})
    student_outputs = frozenset({"hidden_states"})
    classification_only = True

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def student_tokenizer(self, teacher_tokenizer: PreTrainedTokenizerBase,
                          train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
        """The student's WordPiece vocabulary, trained on ``train_texts`` with the teacher's casing, unless the
        pipeline handed one over (``vocabulary_key``)."""
        if self.vocabulary is None:
            self.vocabulary = train_wordpiece(train_texts, self.params.vocab_size,
                                              lowercase=getattr(teacher_tokenizer, "do_lower_case", True))
        return self.vocabulary

    def vocabulary_key(self) -> dict[str, Any]:
        return {"wordpiece_vocab_size": self.params.vocab_size}

    def problems(self, where, spec, experiment):
        """Its one projection maps teacher embeddings into the student's embedding space and teacher hidden states
        into its hidden space, so the two must be one width: no factorised embeddings, from the entry or from the
        general distillation it starts from."""
        shape = spec.student
        source = shape.general_source
        embedding_size = shape.embedding_size
        if source is not None and any(entry.name == source for entry in experiment.general):
            embedding_size = embedding_size or experiment.general_entry(source).student.embedding_size
        if embedding_size is not None:
            return [f"{where}: dualtrain shares one projection between the embeddings and the hidden states, so its "
                    f"student's embeddings must be as wide as its hidden states; a student with embedding_size "
                    f"{embedding_size} cannot take it"]
        return []

    def check_teacher(self, shape: StudentShape, teacher_config: PretrainedConfig) -> None:
        if self.params.vocab_size >= teacher_config.vocab_size:
            raise ValueError(f"params.vocab_size: {self.params.vocab_size} is not smaller than the teacher's "
                             f"vocabulary ({teacher_config.vocab_size}); the student's own vocabulary is there to "
                             "shrink the embedding table")

    def collator(self, student_tokenizer, teacher_tokenizer, max_length, regression, seed):
        return DualCollator(student_tokenizer, teacher_tokenizer, self.params.p_teacher, max_length, seed, regression)

    def build_student(self, teacher: PreTrainedModel, shape: StudentShape) -> PreTrainedModel:
        """A BERT of ``shape`` whose word table has a row per piece of the student's vocabulary (``vocab_size``
        rows before ``student_tokenizer`` has built it)."""
        student = build_student(teacher, self.resolve_shape(shape))
        config = student.config
        rows = len(self.vocabulary) if self.vocabulary is not None else self.params.vocab_size
        embeddings = nn.Embedding(rows, config.hidden_size, padding_idx=config.pad_token_id)
        nn.init.normal_(embeddings.weight, std=config.initializer_range)
        with torch.no_grad():
            embeddings.weight[config.pad_token_id].zero_()
        student.set_input_embeddings(embeddings)
        config.vocab_size = rows
        return student

    def auxiliary_modules(self, student, teacher):
        """The shared projection, trained, and a frozen copy of the teacher's word embeddings for the teacher
        pieces of the mixed input (a copy: the auxiliary modules are moved and checkpointed with the student)."""
        if teacher is None:
            raise ValueError("dualtrain needs the teacher model for its embeddings and width")
        teacher_embeddings = teacher.get_input_embeddings().weight.detach().clone()
        return nn.ModuleDict({
            "projection": SharedProjection(teacher.config.hidden_size, student.config.hidden_size,
                                           self.params.direction),
            "teacher_embeddings": nn.Embedding.from_pretrained(teacher_embeddings, freeze=True),
        })

    def student_forward(self, student, batch, auxiliary, phase):
        missing = [key for key in (STUDENT_INPUT_IDS, STUDENT_UNIT_IDS, UNIT_IDS) if key not in batch]
        if missing:
            raise KeyError(f"dualtrain needs the student's mixed segmentation in the batch (kd.models.dualtrain.dual_batch); "
                           f"missing {missing}")
        embeds = mixed_inputs_embeds(batch[STUDENT_INPUT_IDS], student.get_input_embeddings(),
                                     auxiliary["teacher_embeddings"], auxiliary["projection"])
        return student(
            inputs_embeds=embeds,
            attention_mask=batch.get(STUDENT_ATTENTION_MASK),
            token_type_ids=batch.get(STUDENT_TOKEN_TYPE_IDS),
            output_hidden_states=True,
        )

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        p = self.params
        projection: SharedProjection = auxiliary["projection"]
        teacher_units, student_units = batch[UNIT_IDS], batch[STUDENT_UNIT_IDS]
        n_units = int(max(teacher_units.max(), student_units.max())) + 1
        hidden = student_out.logits.new_zeros(())
        matches = expand_strategy("uniform", len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1)
        for match in matches:
            student_pooled, student_present = pool_units(student_out.hidden_states[match.student_layer],
                                                         student_units, n_units)
            teacher_pooled, teacher_present = pool_units(teacher_out.hidden_states[match.teacher_layer],
                                                         teacher_units, n_units)
            if p.direction == "up":
                student_pooled = projection(student_pooled)
            else:
                teacher_pooled = projection(teacher_pooled)
            value = mean_squared_error(student_pooled, teacher_pooled, student_present & teacher_present)
            hidden = hidden + match.weight * value
        soft = soft_cross_entropy(student_out.logits, teacher_out.logits, p.temperature)
        hard = hard_cross_entropy(student_out.logits, batch["labels"])
        total = p.alpha * soft + (1 - p.alpha) * hard + p.beta * hidden
        return {"soft_ce": soft, "ce": hard, "hidden": hidden, "total": total}
