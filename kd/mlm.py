"""The teacher as a masked LM: adapting its MLM head (or the whole model) to the task's text, masked-token
accuracy on held-out text, and the two readings the transfer corpora need from it: the top-k distribution at
every position of unmasked text (TextSmooth) and the top-K whole-word candidates for a masked word (TinyBERT).

Pure PyTorch and transformers; the stages in ``stages/`` run these inside Ray.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)

from kd.checkpoints import load_with_new_head

log = logging.getLogger(__name__)

# BERT's masking rate; at evaluation every chosen token becomes [MASK], so the score reads "recover the word".
MASK_PROBABILITY = 0.15
IGNORE_INDEX = -100


class MlmSettings(BaseModel):
    """Masked-LM adaptation of the teacher (``teacher.mlm``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=300, ge=1, description="Optimiser steps over the task's train text.")
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=32, ge=1)
    # On the packaged MiniLM (fine-tuned on rt-snippets), 150 steps of 'all' reached 16% masked-token accuracy
    # on dev text where 300 steps of 'head' reached 8%: its last layer keeps too little of the token's identity
    # for a new head alone.
    train: Literal["head", "all"] = Field(
        default="all", description="all: the whole model; head: the MLM head only (its output matrix is the tied, "
        "frozen input embeddings), about half the time per step.")


def masked_lm_from(model_dir: str) -> PreTrainedModel:
    """A masked LM whose encoder is the model in ``model_dir`` (a classifier folder loads: its classifier and
    pooler are dropped). A checkpoint without MLM weights gets a freshly initialised head, and says so in the log."""
    model, new_weights = load_with_new_head(AutoModelForMaskedLM, model_dir)
    if new_weights:
        log.info("%s has no masked-LM head: %d new tensors (%s)", model_dir, len(new_weights), ", ".join(new_weights))
    return model


def head_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The parameters outside the base model: BERT's MLM transform and output bias. The output matrix is tied
    to the input embeddings, so ``named_parameters`` lists it once, under the base model, and it is not here."""
    prefix = model.base_model_prefix + "."
    return [p for name, p in model.named_parameters() if not name.startswith(prefix)]


def logits_at(model: PreTrainedModel, inputs: dict[str, torch.Tensor], chosen: torch.Tensor) -> torch.Tensor:
    """Masked-LM logits [n, V] at the ``chosen`` positions only (a [B, L] mask).

    The 30k-wide vocabulary projection costs about as much as the whole encoder at every position; a masked
    LM scores 15% of them (one per sentence for candidates), so projecting only those is several times faster
    in training and evaluation. The teachers here are BERTs: ``cls`` is BERT's masked-LM head.
    """
    hidden = model.base_model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
    return model.cls(hidden[chosen])


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], pairs: Sequence[str] | None,
            max_length: int) -> list[dict]:
    encoded = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                        max_length=max_length, return_special_tokens_mask=True)
    return [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]


@torch.no_grad()
def masked_token_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                          pairs: Sequence[str] | None = None, max_length: int = 128, batch_size: int = 64,
                          seed: int = 0) -> dict[str, float]:
    """The share of masked tokens the model predicts exactly, with 15% of the (non-special) tokens masked.

    The masking is drawn from ``seed`` alone, so the same texts are masked the same way before and after
    adaptation and the two accuracies are comparable.
    """
    model.eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASK_PROBABILITY, mask_replace_prob=1.0,
                                               random_replace_prob=0.0, seed=seed)
    features = _encode(tokenizer, texts, pairs, max_length)
    correct = total = 0
    for start in range(0, len(features), batch_size):
        batch = collator(features[start:start + batch_size])
        labels = batch.pop("labels")
        chosen = labels != IGNORE_INDEX
        correct += int((logits_at(model, batch, chosen).argmax(-1) == labels[chosen]).sum())
        total += int(chosen.sum())
    return {"accuracy": correct / max(total, 1), "masked_tokens": total}


def adapt(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
          pairs: Sequence[str] | None, settings: MlmSettings, max_length: int, seed: int = 0,
          report_every: int = 50) -> list[dict]:
    """Train the MLM head (or everything) for ``settings.steps`` steps of BERT's 80/10/10 masking over the
    texts, reshuffled each pass. Returns the loss curve, one record per ``report_every`` steps."""
    generator = torch.Generator().manual_seed(seed)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASK_PROBABILITY, seed=seed)
    model.requires_grad_(settings.train == "all")
    trainable = [p for p in model.parameters() if p.requires_grad] if settings.train == "all" else head_parameters(model)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * settings.steps), settings.steps)
    features = _encode(tokenizer, texts, pairs, max_length)
    passes = math.ceil(settings.steps * settings.batch_size / len(features))
    order = itertools.chain.from_iterable(torch.randperm(len(features), generator=generator).tolist() for _ in range(passes))
    history, running = [], []
    # Training the head alone keeps the frozen encoder in eval mode: the head learns the features it will
    # read at inference, without dropout noise.
    model.train(settings.train == "all")
    for step in range(1, settings.steps + 1):
        batch = collator([features[i] for i in itertools.islice(order, settings.batch_size)])
        chosen = batch["labels"] != IGNORE_INDEX
        # Summed, then divided: a batch of short texts may have no masked token, and an empty mean is NaN.
        loss = torch.nn.functional.cross_entropy(logits_at(model, batch, chosen), batch["labels"][chosen],
                                                 reduction="sum") / chosen.sum().clamp_min(1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        running.append(float(loss.detach()))
        if step % report_every == 0 or step == settings.steps:
            history.append({"step": step, "loss/mlm": sum(running) / len(running)})
            running = []
    model.eval()
    return history


@torch.no_grad()
def topk_per_position(model: PreTrainedModel, encoded: dict[str, torch.Tensor], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the top-k token ids (int32) and probabilities (float16) of the masked LM at each of its real
    tokens, [L_i, k] each: the teacher's distribution over what each position could hold, read off unmasked
    input (TextSmooth). Probabilities are the full softmax's, so they sum to less than 1 over the k kept."""
    logits = model(**encoded).logits.float()
    probs, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    lengths = encoded["attention_mask"].sum(1).tolist()
    return [(ids[row, :n].to(torch.int32).numpy(), probs[row, :n].to(torch.float16).numpy())
            for row, n in enumerate(lengths)]


class WholeWordCandidates:
    """TinyBERT's candidate set: mask one word of a sentence, and take the masked LM's K most likely
    replacements that are whole words (no '##' continuation pieces, no special tokens).

    A masked word may span several word pieces; it is replaced by one [MASK] and its replacements are single
    pieces, which covers the common words a masked LM ranks first.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, k: int, max_length: int,
                 batch_size: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.k, self.max_length, self.batch_size = k, max_length, batch_size
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        # BERT vocabularies also hold [unused*] placeholders that are not registered as special tokens.
        self.whole_word = torch.tensor([i not in special and not token.startswith("##")
                                        and not (token.startswith("[") and token.endswith("]"))
                                        for i, token in enumerate(vocab)])
        self.vocab = vocab

    def words(self, text: str) -> list[str]:
        """The text split into words the way the tokenizer splits them before word pieces."""
        return [word for word, _ in self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    @torch.no_grad()
    def for_sentences(self, sentences: Sequence[Sequence[str]]) -> list[list[list[str]]]:
        """Per sentence (a list of words), per word position, its top-K whole-word candidates, best first."""
        variants = [(s, i) for s, words in enumerate(sentences) for i in range(len(words))]
        texts = [" ".join([*sentences[s][:i], self.tokenizer.mask_token, *sentences[s][i + 1:]]) for s, i in variants]
        out: list[list[list[str]]] = [[[] for _ in words] for words in sentences]
        mask_id = self.tokenizer.mask_token_id
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt")
            masked = encoded["input_ids"] == mask_id
            rows = masked.nonzero(as_tuple=True)[0]
            scores = logits_at(self.model, encoded, masked).masked_fill(~self.whole_word, float("-inf"))
            best = scores.topk(self.k, dim=-1).indices.tolist()
            for row, ids in zip(rows.tolist(), best):
                s, i = variants[start + row]
                out[s][i] = [self.vocab[j] for j in ids]
        return out
