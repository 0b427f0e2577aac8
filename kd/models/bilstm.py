"""Tang et al. (2019)'s student: a single-layer BiLSTM, max-pooled over time, then an MLP.

Single sentence:  h = maxpool_t BiLSTM(E x)_t,                  logits = W₂ ReLU(W₁ h + b₁) + b₂.
Sentence pair:    h₁, h₂ from one shared (siamese) encoder,     logits = MLP([h₁, h₂, h₁∘h₂, |h₁ − h₂|]).

It is a transformers ``PreTrainedModel`` registered with the Auto classes, so ``save_pretrained`` and
``AutoModelForSequenceClassification.from_pretrained`` work once this module is imported (``kd.methods`` imports
it), and the training loop, evaluation and model registry treat it like any BERT student.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import SequenceClassifierOutput

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class BiLSTMConfig(PreTrainedConfig):
    """Sizes of the BiLSTM student; the defaults are Tang et al.'s (300-d word2vec, 300 LSTM units, 400 MLP units)."""

    model_type = "kd-bilstm"

    vocab_size: int = 30522
    embedding_dim: int = 300
    hidden_size: int = 300
    num_layers: int = 1
    mlp_hidden: int = 400
    dropout: float = 0.1
    pad_token_id: int | None = 0
    pair: bool = False
    initializer_range: float = 0.02


def left_align(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the tokens selected by ``mask`` to the front of each row, in order; returns (ids, new mask).

    Packing for the LSTM needs each sequence to start at position 0: this covers left padding and the second
    segment of a pair, which sits after the first.
    """
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    lengths = mask.sum(1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return input_ids.gather(1, order), positions < lengths


class BiLSTMForSequenceClassification(PreTrainedModel):
    config: BiLSTMConfig
    config_class = BiLSTMConfig
    base_model_prefix = "bilstm"
    main_input_name = "input_ids"

    def __init__(self, config: BiLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.encoder = nn.LSTM(
            config.embedding_dim, config.hidden_size, num_layers=config.num_layers, batch_first=True,
            bidirectional=True, dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        features = 2 * config.hidden_size * (4 if config.pair else 1)
        self.dropout = nn.Dropout(config.dropout)
        self.mlp = nn.Sequential(
            nn.Linear(features, config.mlp_hidden), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.mlp_hidden, config.num_labels),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token BiLSTM states [B, L, 2H] and their max over the unmasked positions [B, 2H].

        Sequences are packed, so the backward direction starts at each sequence's last real token and padding
        changes nothing; padded positions are set to −inf before the max.
        """
        input_ids, mask = left_align(input_ids, mask.bool())
        # An empty sequence is read as its first (padding) token, so its features stay finite.
        mask[:, 0] = True
        lengths = mask.sum(1)
        embedded = self.dropout(self.embeddings(input_ids))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.encoder(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=input_ids.shape[1])
        pooled = states.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values
        return states, pooled

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        input_ids_b: torch.Tensor | None = None,
        attention_mask_b: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Logits for single sentences, or for pairs given as one sequence (``token_type_ids`` 1 marks the
        second segment, as a BERT tokenizer lays it out) or as an explicit second input (``input_ids_b``).

        ``hidden_states`` holds the per-token BiLSTM states of each encoded sequence (one, or two for pairs);
        ``attentions`` is always None: there is no attention. Other keyword arguments (``return_dict``) are
        accepted for drop-in use where a BERT student was called.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        if not self.config.pair:
            if input_ids_b is not None:
                raise ValueError("this BiLSTM was built for single sentences (pair=False) but got input_ids_b")
            states, features = self.encode(input_ids, attention_mask)
            all_states = (states,)
        else:
            if input_ids_b is not None:
                mask_b = (torch.ones_like(input_ids_b, dtype=torch.bool) if attention_mask_b is None
                          else attention_mask_b.bool())
                segments = ((input_ids, attention_mask), (input_ids_b, mask_b))
            elif token_type_ids is not None:
                second = token_type_ids.bool()
                segments = ((input_ids, attention_mask & ~second), (input_ids, attention_mask & second))
            else:
                raise ValueError("a pair BiLSTM needs token_type_ids or input_ids_b to find the second sentence")
            (states_a, h1), (states_b, h2) = (self.encode(ids, mask) for ids, mask in segments)
            features = torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1)
            all_states = (states_a, states_b)
        logits = self.mlp(self.dropout(features))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.config.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=all_states if output_hidden_states else None, attentions=None
        )


AutoConfig.register(BiLSTMConfig.model_type, BiLSTMConfig)
AutoModelForSequenceClassification.register(BiLSTMConfig, BiLSTMForSequenceClassification)


def embeddings_from_teacher(
    model: BiLSTMForSequenceClassification, teacher: PreTrainedModel
) -> BiLSTMForSequenceClassification:
    """Copy the teacher's input word embeddings into the student (in place; returns it).

    Tang et al. start from pretrained word vectors; the teacher's are the ones at hand. They are copied as they
    are: a projection would be a new, untrained layer, so the widths must already agree.
    """
    weight = teacher.get_input_embeddings().weight
    vocab, width = weight.shape
    if model.config.embedding_dim != width:
        raise ValueError(
            f"the student's embedding_dim ({model.config.embedding_dim}) must equal the teacher's embedding width "
            f"({width}) to copy its embeddings; build the student with embedding_dim={width}, or use random embeddings"
        )
    if model.config.vocab_size != vocab:
        raise ValueError(f"the student's vocab_size ({model.config.vocab_size}) differs from the teacher's ({vocab})")
    with torch.no_grad():
        model.embeddings.weight.copy_(weight)
    return model


def build_vocab(
    texts: Iterable[str], min_freq: int = 1, max_size: int | None = None, lowercase: bool = True
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts``: the alternative to the teacher's WordPiece vocabulary.

    Words are split as BERT splits them (whitespace and punctuation). The vocabulary holds the special tokens
    [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4), then words seen at least ``min_freq`` times, most frequent first,
    up to ``max_size`` entries in all. Inputs are laid out like BERT's, [CLS] a [SEP] (b [SEP]) with token
    types, so the same collator and the pair BiLSTM work with it; it saves with ``save_pretrained``.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer_options = {"min_frequency": min_freq, "special_tokens": list(SPECIAL_TOKENS), "show_progress": False}
    if max_size is not None:
        trainer_options["vocab_size"] = max_size
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(**trainer_options))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
