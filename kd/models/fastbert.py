"""FastBERT (Liu et al., 2020): a fine-tuned BERT with a classifier branch after every layer and per-sample
early exit at inference.

Branch i (layers 1..L−1) reads the [CLS] state of layer i: p_i = softmax(W₂ tanh(W₁ h_i,[CLS] + b₁) + b₂),
with W₁ ∈ R^{h×128} (``branch_hidden_size``). The branch of layer L is the wrapped model's own head (pooler,
dropout, classifier), so wrapping a fine-tuned classifier changes none of its outputs: ``forward`` returns the final
classifier's logits and the standard evaluation reads the model as it read the original. (The paper's branches
also run a self-attention layer over the sequence before pooling; an MLP on [CLS] keeps each branch a small
fraction of a layer's cost.)

Self-distillation (kd.methods.fastbert) trains the branches alone, with the backbone and the final classifier
frozen: L = Σ_{i<L} KL(p_L ‖ p_i).

Adaptive inference (``adaptive_forward``) runs the layers one at a time. After layer i every still-active sample
computes its branch distribution p_i and its normalised entropy

    Uncertainty(p_i) = −Σ_c p_i,c log p_i,c / log C  ∈ [0, 1]

and leaves with p_i when Uncertainty < speed; the others go on, and only they are computed in the next layer.
The comparison is strict, so speed = 0 exits nobody early (entropy is never below 0, even for a one-hot p) and
speed = 1 exits everybody at layer 1 except a sample whose distribution is exactly uniform (Uncertainty = 1).
Every sample still active at layer L exits there.

The model is a transformers ``PreTrainedModel`` registered with the Auto classes (model_type "kd-fastbert"), so
``save_pretrained`` / ``AutoModelForSequenceClassification.from_pretrained`` keep the branches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    PreTrainedModel,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertPreTrainedModel

# Keys of a config's dict that describe the saved model, not its architecture: they must not follow a BERT config
# into a FastBERT one.
_CONFIG_METADATA = ("model_type", "architectures", "transformers_version", "_name_or_path")


class FastBertConfig(BertConfig):
    """A BERT config plus the width of the non-final branches' hidden layer (128 in the paper)."""

    model_type = "kd-fastbert"

    branch_hidden_size: int = 128


@dataclass
class FastBertOutput(SequenceClassifierOutput):
    """The final classifier's output; ``branch_logits`` holds every layer's logits (layer 1 first, the last one
    the final classifier's) when asked for with ``output_branch_logits=True``."""

    branch_logits: tuple[torch.Tensor, ...] | None = None


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """FastBERT's uncertainty, H(softmax(z)) / log C, per row of ``logits`` [B, C]: 0 for one-hot, 1 for uniform."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy / math.log(logits.shape[-1])


class FastBertForSequenceClassification(BertPreTrainedModel):
    config: FastBertConfig
    config_class = FastBertConfig

    def __init__(self, config: FastBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        # The final branch keeps BertForSequenceClassification's names (bert.pooler, dropout, classifier), so a
        # fine-tuned classifier's state dict loads into this model unchanged.
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Linear(config.hidden_size, config.branch_hidden_size),
                nn.Tanh(),
                nn.Linear(config.branch_hidden_size, config.num_labels),
            )
            for _ in range(config.num_hidden_layers - 1)
        )
        self.post_init()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def branch_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the branch after ``layer`` (1-based) from that layer's states [B, L, h]; layer L is the final
        classifier, read through the pooler as the original model reads it."""
        if layer == self.num_layers:
            return self.classifier(self.dropout(self.bert.pooler(hidden)))
        return self.branches[layer - 1](hidden[:, 0])

    def freeze_backbone(self) -> None:
        """Freeze everything but the non-final branches: self-distillation trains the branches alone."""
        self.bert.requires_grad_(False)
        self.classifier.requires_grad_(False)
        self.branches.requires_grad_(True)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_branch_logits: bool = False,
        **kwargs,
    ) -> FastBertOutput:
        """The full model, as the wrapped classifier: logits of the final classifier; hidden states and
        attentions pass through from BERT. The branches are computed only with ``output_branch_logits``."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            # The branches read every layer's states, so they are collected whenever the branches are asked for.
            output_hidden_states=bool(output_hidden_states or output_branch_logits),
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        branch_logits = None
        if output_branch_logits:
            layer_states = outputs.hidden_states[1:]
            branch_logits = tuple(
                self.branch_logits(layer, state) for layer, state in enumerate(layer_states[:-1], start=1)
            ) + (logits,)
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return FastBertOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
            branch_logits=branch_logits,
        )

    @torch.no_grad()
    def adaptive_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        speed: float = 0.5,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample early exit: (logits [B, C], exit layer [B], 1-based).

        A sample exits after layer i with branch i's logits when H(p_i)/log C < ``speed``; only the samples
        still active are run through the next layer (see the module docstring for speed 0 and 1).
        """
        if self.num_labels < 2:
            raise ValueError("early exit by entropy needs a classifier of at least 2 labels")
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        logits = hidden.new_zeros(batch_size, self.num_labels)
        exit_layer = torch.zeros(batch_size, dtype=torch.long, device=input_ids.device)
        active = torch.arange(batch_size, device=input_ids.device)
        mask = attention_mask
        for layer_index, layer in enumerate(self.bert.encoder.layer, start=1):
            layer_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
            hidden = layer(hidden, attention_mask=layer_mask)
            layer_logits = self.branch_logits(layer_index, hidden)
            if layer_index == self.num_layers:
                leaving = torch.ones(active.shape[0], dtype=torch.bool, device=active.device)
            else:
                leaving = normalized_entropy(layer_logits) < speed
            logits[active[leaving]] = layer_logits[leaving].to(logits.dtype)
            exit_layer[active[leaving]] = layer_index
            staying = ~leaving
            if not staying.any():
                break
            active, hidden, mask = active[staying], hidden[staying], mask[staying]
        return logits, exit_layer


class EarlyExit(nn.Module):
    """``model``'s adaptive inference at one ``speed`` behind the plain ``model(**inputs)`` call, so a harness that
    times a forward pass (kd.evaluation.measure_latency) times the early-exit path; returns the exit logits."""

    def __init__(self, model: FastBertForSequenceClassification, speed: float):
        super().__init__()
        self.model = model
        self.speed = speed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = self.model.adaptive_forward(input_ids, attention_mask, token_type_ids, speed=self.speed)
        return logits


AutoConfig.register(FastBertConfig.model_type, FastBertConfig)
AutoModelForSequenceClassification.register(FastBertConfig, FastBertForSequenceClassification)


def fastbert_from(model: PreTrainedModel, branch_hidden_size: int = 128) -> FastBertForSequenceClassification:
    """A FastBERT around a fine-tuned ``BertForSequenceClassification``: its backbone, pooler and classifier are
    copied (the classifier becomes the final branch); the non-final branches start at random."""
    settings = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_METADATA}
    config = FastBertConfig(**{**settings, "branch_hidden_size": branch_hidden_size})
    config._attn_implementation = model.config._attn_implementation
    fast = FastBertForSequenceClassification(config)
    missing, unexpected = fast.load_state_dict(model.state_dict(), strict=False)
    not_copied = [key for key in missing if not key.startswith("branches.")]
    if not_copied or unexpected:
        raise ValueError(f"cannot wrap {type(model).__name__} into FastBERT: missing {not_copied}, "
                         f"unexpected {unexpected}; it must be a BERT sequence classifier")
    return fast


def speed_sweep(
    model: FastBertForSequenceClassification,
    batches: Sequence[Mapping[str, torch.Tensor]],
    labels: torch.Tensor | Iterable[int],
    speeds: Iterable[float],
) -> list[dict[str, float]]:
    """Accuracy, mean exit layer and latency of adaptive inference at each speed.

    ``batches`` (re-read once per speed) hold input_ids and optionally attention_mask / token_type_ids;
    ``labels`` are those of all their examples, in order. ``latency_ms`` is the mean wall time per batch,
    by ``time.perf_counter`` (after a CUDA synchronise on a GPU, so queued kernels are counted).
    """
    model.eval()
    device = next(model.parameters()).device
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, device=device)
    results = []
    for speed in speeds:
        predictions, exits, elapsed = [], [], 0.0
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            logits, exit_layer = model.adaptive_forward(**inputs, speed=speed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            predictions.append(logits.argmax(-1))
            exits.append(exit_layer)
        predicted = torch.cat(predictions)
        if predicted.shape != labels.shape:
            raise ValueError(f"{predicted.shape[0]} examples in the batches but {labels.shape[0]} labels")
        results.append({
            "speed": float(speed),
            "accuracy": (predicted == labels).float().mean().item(),
            "avg_exit_layer": torch.cat(exits).float().mean().item(),
            "latency_ms": 1000.0 * elapsed / max(len(batches), 1),
        })
    return results
