"""A MobileBERT-style bottleneck student (Sun et al., 2020): narrow between blocks, wide inside them.

The states passed from block to block have the inter-block width d (``hidden_size``, e.g. 128); inside block l
they are widened to the intra-block width d' (``intra_size``, e.g. 512), attention and the feed-forward network
run at d', and a linear map brings the result back to d:

    u   = LN(x W_in + b_in)                          x ∈ R^{n×d},  W_in ∈ R^{d×d'}
    a   = LN(u + MultiHead(u))                       attention at width d'
    f   = LN(a + W₂ act(a W₁ + b₁) + b₂)             FFN of width ``intermediate_size`` at d'
    out = LN(x + f W_out + b_out)                    W_out ∈ R^{d'×d}

So the parameters that scale with the sequence's token states (embeddings, the residual stream) are d wide, and
``hidden_states`` (the embedding output, then each block's output) are d wide. Attention is computed explicitly
(eager), and ``attentions`` holds each block's scaled scores QKᵀ/√d [B, heads, L, L], before the padding mask and
softmax, so free of attention dropout: the same maps kd.attention's implementation returns for a BERT, which
distillation compares. MobileBERT's other changes
(NoNorm instead of LayerNorm, stacked FFNs, ReLU, the 3-convolution embedding) are left out: this student keeps
BERT's blocks and adds only the bottleneck.

It is a transformers ``PreTrainedModel`` registered with the Auto classes (model_type "kd-mobilebert"), so
``save_pretrained`` and ``AutoModelForSequenceClassification.from_pretrained`` work once this module is imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput


class BottleneckBertConfig(PreTrainedConfig):
    """Sizes of the bottleneck student; ``hidden_size`` is the inter-block width, ``intra_size`` the width attention
    and the FFN run at (the defaults are MobileBERT-like: 128 between blocks, 512 inside)."""

    model_type = "kd-mobilebert"

    vocab_size: int = 30522
    hidden_size: int = 128
    intra_size: int = 512
    num_hidden_layers: int = 24
    num_attention_heads: int = 4
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0


class BottleneckEmbeddings(nn.Module):
    """Word + position + token-type embeddings, all at the inter-block width, then LayerNorm and dropout."""

    def __init__(self, config: BottleneckBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, inputs_embeds: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        embeddings = inputs_embeds + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BottleneckSelfAttention(nn.Module):
    """Multi-head self-attention at the intra-block width; returns the output and the unmasked scaled scores."""

    def __init__(self, config: BottleneckBertConfig):
        super().__init__()
        if config.intra_size % config.num_attention_heads:
            raise ValueError(f"intra_size {config.intra_size} is not divisible by "
                             f"{config.num_attention_heads} attention heads")
        self.heads = config.num_attention_heads
        self.head_size = config.intra_size // config.num_attention_heads
        self.query = nn.Linear(config.intra_size, config.intra_size)
        self.key = nn.Linear(config.intra_size, config.intra_size)
        self.value = nn.Linear(config.intra_size, config.intra_size)
        self.dense = nn.Linear(config.intra_size, config.intra_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = (self._split(project(hidden)) for project in (self.query, self.key, self.value))
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_size)
        probabilities = (scores + additive_mask).softmax(-1)
        context = (self.dropout(probabilities) @ value).transpose(1, 2).reshape(hidden.shape)
        return self.dense(context), scores


class BottleneckLayer(nn.Module):
    """One block: bottleneck in (d → d'), attention and FFN at d', bottleneck out (d' → d) onto the residual."""

    def __init__(self, config: BottleneckBertConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.bottleneck_in = nn.Linear(config.hidden_size, config.intra_size)
        self.input_norm = nn.LayerNorm(config.intra_size, eps=eps)
        self.attention = BottleneckSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.intra_size, eps=eps)
        self.intermediate = nn.Linear(config.intra_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.ffn_output = nn.Linear(config.intermediate_size, config.intra_size)
        self.ffn_norm = nn.LayerNorm(config.intra_size, eps=eps)
        self.bottleneck_out = nn.Linear(config.intra_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.input_norm(self.bottleneck_in(hidden))
        attended, scores = self.attention(inner, additive_mask)
        inner = self.attention_norm(inner + self.dropout(attended))
        inner = self.ffn_norm(inner + self.dropout(self.ffn_output(self.activation(self.intermediate(inner)))))
        return self.output_norm(hidden + self.dropout(self.bottleneck_out(inner))), scores


class BottleneckBertForSequenceClassification(PreTrainedModel):
    config: BottleneckBertConfig
    config_class = BottleneckBertConfig
    base_model_prefix = "bottleneck_bert"
    main_input_name = "input_ids"

    def __init__(self, config: BottleneckBertConfig):
        super().__init__(config)
        self.embeddings = BottleneckEmbeddings(config)
        self.layers = nn.ModuleList(BottleneckLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Logits from BERT's head (tanh pooler on [CLS], dropout, linear); ``hidden_states`` are the embedding
        output and each block's output (inter width), ``attentions`` each block's unmasked scaled scores. Other keyword
        arguments (``return_dict``) are accepted for drop-in use where a BERT student was called."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        shape = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=inputs_embeds.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(shape, dtype=torch.long, device=inputs_embeds.device)
        hidden = self.embeddings(inputs_embeds, token_type_ids)
        # Padded keys get the dtype's most negative number rather than −inf, so a row with no real key stays finite.
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        all_hidden, all_attentions = [hidden], []
        for layer in self.layers:
            hidden, scores = layer(hidden, additive_mask)
            all_hidden.append(hidden)
            all_attentions.append(scores)
        logits = self.classifier(self.dropout(torch.tanh(self.pooler(hidden[:, 0]))))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.config.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


AutoConfig.register(BottleneckBertConfig.model_type, BottleneckBertConfig)
AutoModelForSequenceClassification.register(BottleneckBertConfig, BottleneckBertForSequenceClassification)
