"""DistilBERT (Sanh et al., 2019): soft cross-entropy, masked-LM and a cosine loss on the last hidden states."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import AutoTokenizer, BertForMaskedLM

from kd.layer_maps import LayerMatch
from kd.losses import get_loss, soft_cross_entropy
from kd.methods.base import Method, MethodParams, register_method
from kd.projections import hidden_width, width_projections

MASK_PROBABILITY = 0.15  # BERT's and DistilBERT's share of tokens chosen for prediction
IGNORE_INDEX = -100
ENCODER_INPUTS = ("attention_mask", "token_type_ids")


class DistilBertParams(MethodParams):
    temperature: float = Field(default=2.0, gt=0, description="Softmax temperature T of the soft cross-entropy.")
    alpha_ce: float = Field(default=5.0, ge=0, description="Weight of the soft cross-entropy to the teacher.")
    alpha_mlm: float = Field(default=2.0, ge=0, description="Weight of the masked-LM term (on only with mlm_head).")
    alpha_cos: float = Field(default=1.0, ge=0, description="Weight of the cosine loss on the last hidden states.")
    mlm_head: str | None = Field(
        default=None,
        description="Folder of a saved BertForMaskedLM and its tokenizer; its `cls` head scores the student's "
        "masked pass. None turns the masked-LM term off.",
    )
    mlm_seed: int = Field(default=0, description="Seed of the per-step token masking.")


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = MASK_PROBABILITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each real, non-special token is chosen with ``probability``; a chosen token becomes [MASK]
    80% of the time, a random token 10%, and stays 10%. Returns the masked ids and the labels (the original id at
    chosen positions, -100 elsewhere)."""
    # Drawn on the CPU generator so the mask depends on the seed alone, not on the device.
    chosen_draw, action_draw = torch.rand((2, *input_ids.shape), generator=generator).to(input_ids.device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator).to(input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    chosen = candidates & (chosen_draw < probability)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    masked = torch.where(chosen & (action_draw < 0.8), mask_token_id, input_ids)
    masked = torch.where(chosen & (action_draw >= 0.8) & (action_draw < 0.9), random_ids, masked)
    return masked, labels


class MaskedLMHead(nn.Module):
    """The masked-LM head of a sequence-classifier student, copied from a saved BertForMaskedLM and trained along,
    with the per-step masking of its input. Step k masks with seed + k; the step count is a buffer saved with the
    checkpoint, so a resumed run masks as an uninterrupted one would."""

    def __init__(self, head: nn.Module, mask_token_id: int, special_ids: list[int], vocab_size: int, seed: int):
        super().__init__()
        self.head = head
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.seed = seed
        self.register_buffer("special_ids", torch.tensor(sorted(special_ids)), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_pretrained(cls, folder: str, student: nn.Module, width: int, seed: int) -> "MaskedLMHead":
        """The head of the BertForMaskedLM in ``folder``; it reads hidden states of ``width`` (the teacher's)."""
        mlm = BertForMaskedLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if mlm.config.hidden_size != width:
            raise ValueError(f"mlm_head {folder!r} reads width {mlm.config.hidden_size}, the teacher's is {width}")
        if mlm.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"mlm_head {folder!r} has {mlm.config.vocab_size} words, the student "
                             f"{student.config.vocab_size}")
        if tokenizer.mask_token_id is None:
            raise ValueError(f"the tokenizer in mlm_head {folder!r} has no mask token")
        predictions = mlm.cls.predictions
        # A standalone copy: in BertForMaskedLM the decoder shares its weight with the word embeddings and its
        # bias with ``predictions.bias``, and shared tensors cannot be saved to safetensors.
        decoder = nn.Linear(predictions.decoder.in_features, predictions.decoder.out_features)
        with torch.no_grad():
            decoder.weight.copy_(predictions.decoder.weight)
            decoder.bias.copy_(predictions.decoder.bias)
        head = nn.Sequential(copy.deepcopy(predictions.transform), decoder)
        return cls(head, tokenizer.mask_token_id, tokenizer.all_special_ids, mlm.config.vocab_size, seed)

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's masked ids and labels (see ``mask_tokens``); each call is one step."""
        generator = torch.Generator().manual_seed(self.seed + int(self.steps))
        self.steps += 1
        return mask_tokens(input_ids, attention_mask, self.special_ids, self.mask_token_id, self.vocab_size, generator)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(hidden_states)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the original ids at the chosen positions; a sum over them divided by their count, so a batch
    where none was chosen gives 0 rather than NaN."""
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


@dataclass
class DistilBertStudentOutput:
    """The student's plain pass, and with the masked-LM term on, its masked pass read by the MLM head."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    mlm_logits: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None


@register_method
class DistilBert(Method):
    """L = α_ce · T² · CE(softmax(z_t/T), softmax(z_s/T)) + α_mlm · L_mlm + α_cos · mean_tokens(1 − cos(h_s W, h_t)).

    h are the last hidden states of student and teacher, padded tokens left out; W maps the student's width to the
    teacher's and is the identity when they match. L_mlm is the cross-entropy of the original ids at the masked
    positions of a second student pass over a masked copy of the batch (BERT's 15% masking, 80/10/10). A classifier
    student has no MLM head, so the head comes from ``mlm_head`` and reads the projected states h W; without a head
    the term is off. The student starts from every other teacher layer.
    """

    name = "distilbert"
    Params = DistilBertParams
    online_signals = frozenset({"logits", "hidden_states"})
    student_outputs = frozenset({"hidden_states"})
    default_init = "every_other"

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.mlm_head is None and self.params.alpha_mlm > 0:
            warnings.warn(
                f"distilbert: alpha_mlm={self.params.alpha_mlm} but no mlm_head is set, so the masked-LM term is off",
                stacklevel=2,
            )

    @property
    def mlm_on(self) -> bool:
        return self.params.mlm_head is not None and self.params.alpha_mlm > 0

    def ensemble_temperature(self) -> float:
        return self.params.temperature

    def reads_mlm_teacher(self) -> bool:
        """The masked-LM term is on and no ``mlm_head`` of its own is given: it takes the head of the pipeline's
        masked-LM teacher, since the packaged MiniLM has none to offer."""
        return self.params.alpha_mlm > 0 and self.params.mlm_head is None

    def problems(self, where, spec, experiment):
        if self.reads_mlm_teacher() and experiment.teacher.mlm is None:
            return [f"{where}: distilbert: params.alpha_mlm > 0 turns on the masked-LM term, which reads the "
                    "masked-LM teacher's head; set teacher.mlm, or params.mlm_head, or params.alpha_mlm: 0"]
        return []

    def layer_matches(self, n_teacher: int, n_student: int) -> list[LayerMatch]:
        return [LayerMatch(student_layer=n_student, teacher_layer=n_teacher, feature="hidden", loss="cos")]

    def auxiliary_modules(self, student, teacher):
        modules = width_projections(student, teacher, ["hidden"])
        if self.mlm_on:
            modules["mlm"] = MaskedLMHead.from_pretrained(
                self.params.mlm_head, student, hidden_width(teacher), self.params.mlm_seed
            )
        return modules

    def student_forward(self, student, batch, auxiliary, phase):
        out = super().student_forward(student, batch, auxiliary, phase)
        if "mlm" not in auxiliary:
            return DistilBertStudentOutput(out.logits, out.hidden_states)
        attention_mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        masked, labels = auxiliary["mlm"].mask(batch["input_ids"], attention_mask)
        encoder_inputs = {k: batch[k] for k in ENCODER_INPUTS if k in batch}
        hidden = student.base_model(input_ids=masked, **encoder_inputs).last_hidden_state
        mlm_logits = auxiliary["mlm"](auxiliary["hidden"](hidden))
        return DistilBertStudentOutput(out.logits, out.hidden_states, mlm_logits, labels)

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        p = self.params
        mask = batch.get("attention_mask")
        cos = student_out.logits.new_zeros(())
        matches = self.layer_matches(len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1)
        for match in matches:
            student_hidden = auxiliary["hidden"](student_out.hidden_states[match.student_layer])
            teacher_hidden = teacher_out.hidden_states[match.teacher_layer]
            cos = cos + match.weight * get_loss(match.loss)(student_hidden, teacher_hidden, mask)
        soft = soft_cross_entropy(student_out.logits, teacher_out.logits, p.temperature)
        losses = {"soft_ce": soft, "cos": cos}
        total = p.alpha_ce * soft + p.alpha_cos * cos
        if student_out.mlm_logits is not None:
            losses["mlm"] = masked_lm_loss(student_out.mlm_logits, student_out.mlm_labels)
            total = total + p.alpha_mlm * losses["mlm"]
        return {**losses, "total": total}
