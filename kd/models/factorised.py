"""A BERT whose embeddings are factorised as in ALBERT (Lan et al., 2020) and MobileBERT: the word, position and
token-type tables are ``embedding_size`` (E) wide, and one linear map lifts their sum to the hidden width H:

    e   = Dropout(LN_E(W_word[x] + W_pos[p] + W_type[t]))      W_word ∈ R^{V×E}
    h_0 = e W_lift + b_lift                                     W_lift ∈ R^{E×H}

The blocks, pooler and classifier are transformers' own BERT modules at width H. A small student's size is
dominated by its V × H word table (30522 × 256 is 7.8M of an 11M-parameter, 4-layer BERT); at E = 128 it halves.

``hidden_states[0]`` is h_0, the lifted embedding output, so every hidden state is H wide as in a BERT, and hidden-
state distillation needs nothing new. ``get_input_embeddings()`` is the E-wide word table: resizing the vocabulary
and tying keep working, and ``inputs_embeds`` are rows of that table (E wide), lifted like the looked-up ones.

The masked LM ends in the E-wide space so that its decoder can be the word table (ALBERT's head): dense H → E,
activation, LayerNorm(E), decoder E → V tied to the input embeddings, plus a per-word bias. Its modules are named as
BERT's (``cls.predictions.transform.dense``, ``.LayerNorm``, ``cls.predictions.decoder``, ``.bias``).

The models are transformers ``PreTrainedModel``s registered with the Auto classes (model type
"kd-factorised-bert"), so ``save_pretrained`` and ``AutoModel``, ``AutoModelForSequenceClassification`` and
``AutoModelForMaskedLM.from_pretrained`` work once this module is imported. It imports only torch and transformers
(a served model carries this one module; see stages.register.architecture_module).
"""

from __future__ import annotations

import copy

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertPooler, BertPreTrainedModel


@strict
class FactorisedBertConfig(BertConfig):
    """A ``BertConfig`` plus ``embedding_size``, the width of the embedding tables (E ≥ 1; E == hidden_size is
    allowed but only adds the lift to a plain BERT)."""

    model_type = "kd-factorised-bert"

    embedding_size: int = 128

    def validate_embedding_size(self):
        """Part of ``@strict``'s validation: runs on construction and on ``validate()`` (``save_pretrained``)."""
        if self.embedding_size < 1:
            raise ValueError(f"embedding_size must be at least 1, not {self.embedding_size}")


class FactorisedBertEmbeddings(BertEmbeddings):
    """BERT's embeddings (word, position and token-type tables, LayerNorm, dropout) at width E, then a linear lift
    to the hidden width H. A ``BertEmbeddings`` built at width E, so transformers' BERT initialisation (its
    position-id buffers included) applies to it unchanged."""

    def __init__(self, config: FactorisedBertConfig):
        narrow = copy.copy(config)  # the same settings with hidden_size = E: BertEmbeddings sizes its modules by it
        narrow.hidden_size = config.embedding_size
        super().__init__(narrow)
        self.projection = nn.Linear(config.embedding_size, config.hidden_size)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.projection(super().forward(*args, **kwargs))


class FactorisedPredictionHeadTransform(nn.Module):
    """BERT's head transform, but from H down to E: dense H → E, activation, LayerNorm(E)."""

    def __init__(self, config: FactorisedBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.transform_act_fn = (ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str)
                                 else config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class FactorisedLMPredictionHead(nn.Module):
    """The E-wide transform, then the decoder E → V (its weight tied to the word table) with a per-word bias."""

    def __init__(self, config: FactorisedBertConfig):
        super().__init__()
        self.transform = FactorisedPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class FactorisedOnlyMLMHead(nn.Module):
    def __init__(self, config: FactorisedBertConfig):
        super().__init__()
        self.predictions = FactorisedLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class FactorisedBertPreTrainedModel(BertPreTrainedModel):
    """BERT's base class with the factorised config. Its ``_init_weights`` (transformers' generic one: normal
    Linear and Embedding weights, zero biases, unit LayerNorms; and BERT's position-id buffers) covers the new
    modules; the LM head's bias, a bare parameter, is zeroed here as BERT zeroes its own."""

    config: FactorisedBertConfig
    config_class = FactorisedBertConfig
    _no_split_modules = ["FactorisedBertEmbeddings", "BertLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FactorisedLMPredictionHead):
            init.zeros_(module.bias)


# The three models below are transformers' BERT classes (their forward, output capture and embedding accessors) with
# their __init__ written out: calling BERT's own would first build and initialise a V × H word table, only for it
# to be thrown away. Each mirrors the corresponding BERT __init__ with the factorised embeddings or head in place.

class FactorisedBertModel(FactorisedBertPreTrainedModel, BertModel):
    def __init__(self, config: FactorisedBertConfig, add_pooling_layer: bool = True):
        BertPreTrainedModel.__init__(self, config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = FactorisedBertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()


class FactorisedBertForSequenceClassification(FactorisedBertPreTrainedModel, BertForSequenceClassification):
    def __init__(self, config: FactorisedBertConfig):
        BertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.config = config
        self.bert = FactorisedBertModel(config)
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class FactorisedBertForMaskedLM(FactorisedBertPreTrainedModel, BertForMaskedLM):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: FactorisedBertConfig):
        BertPreTrainedModel.__init__(self, config)
        self.bert = FactorisedBertModel(config, add_pooling_layer=False)
        self.cls = FactorisedOnlyMLMHead(config)
        self.post_init()


AutoConfig.register(FactorisedBertConfig.model_type, FactorisedBertConfig)
AutoModel.register(FactorisedBertConfig, FactorisedBertModel)
AutoModelForSequenceClassification.register(FactorisedBertConfig, FactorisedBertForSequenceClassification)
AutoModelForMaskedLM.register(FactorisedBertConfig, FactorisedBertForMaskedLM)
