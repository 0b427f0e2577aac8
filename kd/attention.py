"""An attention implementation for Hugging Face models whose attention maps can be distilled.

Eager attention returns the probabilities after attention dropout, so a student in train mode hands its loss a
map with a share p of its entries zeroed and the rest scaled by 1/(1 − p): an MSE against the teacher's map is
mostly noise. TinyBERT's attention loss reads the pre-softmax scores anyway. ``SCORES_ATTENTION`` computes the
output as eager does (mask, softmax, dropout, weighted sum), bit for bit, but returns as the attention weights the
scaled scores QKᵀ/√d, free of dropout and before the padding mask is added: the loss leaves padded pairs out
itself, and the mask's huge negative number would otherwise swamp any mean over them.

Importing this module registers the implementation (and eager's additive float mask for it); load a model and
``model.set_attn_implementation(SCORES_ATTENTION)`` to use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

SCORES_ATTENTION = "kd_scores"


def scores_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (transformers' ``eager_attention_forward``) returning (output, scores [B, heads, q, k])."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    masked = scores if attention_mask is None else scores + attention_mask
    probabilities = F.dropout(F.softmax(masked, dim=-1), p=dropout, training=module.training)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, scores


AttentionInterface.register(SCORES_ATTENTION, scores_attention_forward)
# Without a mask function of its own, transformers builds no padding mask at all for an unknown implementation.
AttentionMaskInterface.register(SCORES_ATTENTION, eager_mask)
