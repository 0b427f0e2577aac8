"""Loading checkpoints: a saved classifier and its tokenizer, and a checkpoint under another head (a pretrained
encoder as a classifier, a classifier as a masked LM)."""

from __future__ import annotations

import logging

from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as transformers_logging

from kd.attention import SCORES_ATTENTION


def load_with_new_head(auto_class, source: str, **kwargs) -> tuple[PreTrainedModel, list[str]]:
    """The model ``auto_class`` builds from ``source`` and the names of the weights it initialised afresh (missing
    from the checkpoint, or there with another shape: a 3-way classifier loaded for 2 labels).

    A new head is what the callers expect, so transformers' load report, a warning table of every missing and
    unexpected key, is held back; they say in one line what it means. A new weight inside the base model is not
    expected: the encoder would start from random numbers, so that raises ``ValueError``.
    """
    report_logger = transformers_logging.get_logger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        model, info = auto_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True,
                                                 **kwargs)
    finally:
        report_logger.setLevel(level)
    new = sorted({*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])})
    encoder = [key for key in new if key.startswith(model.base_model_prefix + ".")]
    if encoder:
        raise ValueError(f"{source}: the checkpoint has no encoder weights for {len(encoder)} tensors of "
                         f"{type(model).__name__} (first: {encoder[0]}); is it a {model.config.model_type} model?")
    return model, new


def load_classifier(source: str, num_labels: int, attentions: bool = False):
    """A sequence classifier; with ``attentions``, kd.attention's implementation, whose maps are the dropout-free
    pre-softmax scores distillation compares (sdpa returns no maps, eager's are after dropout)."""
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    if attentions:
        model.set_attn_implementation(SCORES_ATTENTION)
    return model


def load_tokenizer(source: str):
    return AutoTokenizer.from_pretrained(source)
