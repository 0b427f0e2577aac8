"""A small Transformer encoder-decoder student for C-MLM distillation (kd.cmlm), built as a transformers BART
(``BartForConditionalGeneration``), so ``save_pretrained``, ``AutoModelForSeq2SeqLM.from_pretrained`` and
``generate`` work unchanged.

Vocabulary: the teacher's BERT WordPiece vocabulary, because the teacher's soft targets are distributions over
its ids. BERT's special tokens take BART's roles:

    pad_token_id           = [PAD]
    bos_token_id           = [CLS]
    eos_token_id           = [SEP]   the labels end with it (kd.cmlm.student_batch); generation stops at it
    decoder_start_token_id = [CLS]   the decoder reads [CLS] t1 t2 … and predicts t1 t2 … [SEP]

[CLS] starts the decoder because it starts every sequence BERT reads; BART's own habit of starting with its
end token is a quirk of fairseq's pre-training, not something this vocabulary has. ``forced_eos_token_id``
is left unset, so generation is plain greedy or beam search.

Teacher-shifted decoder inputs: given only ``labels``, BART's forward builds ``decoder_input_ids`` itself with
``shift_tokens_right(labels, pad_token_id, decoder_start_token_id)`` (-100 becomes [PAD]), so no shift is
written here.

``init: teacher`` copies the teacher's BERT into the encoder: word embeddings (BART ties them to the decoder's
input embeddings and to the output projection, so all three start from them), position embeddings, the
embedding LayerNorm and the teacher's first ``encoder_layers`` blocks. The decoder starts at random, as the
paper's student did. With BERT's activation and post-LayerNorm blocks, which BART shares, the student's encoder
then computes what the teacher's first layers compute on a single-segment input; what differs is the
LayerNorm epsilon (BART fixes 1e-5, BERT uses 1e-12), negligible next to the variance it is added to.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import BartConfig, BartForConditionalGeneration, BertConfig, PreTrainedModel, PreTrainedTokenizerBase


class Seq2SeqShape(BaseModel):
    """The student's size and where its encoder's weights come from."""

    model_config = ConfigDict(extra="forbid")

    encoder_layers: int = Field(ge=1)
    decoder_layers: int = Field(ge=1)
    d_model: int = Field(ge=8, description="Width of the token states, encoder and decoder alike.")
    heads: int = Field(ge=1, description="Attention heads, in every attention block.")
    ffn_dim: int = Field(ge=8, description="Inner width of each block's feed-forward network.")
    init: Literal["random", "teacher"] = Field(
        default="random",
        description="teacher: the encoder starts from the teacher's embeddings and first blocks (needs the "
        "teacher's d_model, heads and ffn_dim); random: everything starts at random.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Seq2SeqShape:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by {self.heads} heads")
        return self


def seq2seq_config(teacher_config: BertConfig, tokenizer: PreTrainedTokenizerBase, shape: Seq2SeqShape) -> BartConfig:
    """The BART config of ``shape`` over the teacher's vocabulary, with BERT's special tokens in BART's roles,
    and the teacher's activation, dropout and position range."""
    if len(tokenizer) > teacher_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, "
                         f"the teacher's vocabulary {teacher_config.vocab_size}")
    return BartConfig(
        vocab_size=teacher_config.vocab_size,
        d_model=shape.d_model,
        encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        max_position_embeddings=teacher_config.max_position_embeddings,
        activation_function=teacher_config.hidden_act,
        dropout=teacher_config.hidden_dropout_prob,
        attention_dropout=teacher_config.attention_probs_dropout_prob,
        # BERT adds its embeddings unscaled; scaling by √d_model would break the copied encoder's input.
        scale_embedding=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id,
        forced_eos_token_id=None,
    )


def _width_mismatches(teacher_config: BertConfig, shape: Seq2SeqShape) -> list[str]:
    pairs = {"d_model": (shape.d_model, teacher_config.hidden_size),
             "heads": (shape.heads, teacher_config.num_attention_heads),
             "ffn_dim": (shape.ffn_dim, teacher_config.intermediate_size)}
    return [f"{name} {ours} ≠ teacher's {theirs}" for name, (ours, theirs) in pairs.items() if ours != theirs]


@torch.no_grad()
def _copy_teacher_encoder(student: BartForConditionalGeneration, bert: PreTrainedModel) -> None:
    embeddings, encoder = bert.embeddings, student.model.encoder
    student.model.shared.weight.copy_(embeddings.word_embeddings.weight)
    # BART adds one learned vector per position, looked up at position + 2 (two rows reserved by fairseq);
    # BERT adds a position vector and a token-type vector. The student's encoder reads the source alone,
    # segment A, so type 0's vector is folded into every position's: the sum BART adds is then BERT's.
    positions = embeddings.position_embeddings.weight + embeddings.token_type_embeddings.weight[0]
    offset = encoder.embed_positions.offset
    encoder.embed_positions.weight[offset:offset + positions.shape[0]].copy_(positions)
    encoder.layernorm_embedding.load_state_dict(embeddings.LayerNorm.state_dict())
    # BERT's blocks, like BART's, normalise after each residual sum: the modules map one to one.
    for bart_layer, bert_layer in zip(encoder.layers, bert.encoder.layer):
        attention = bert_layer.attention
        for bart_module, bert_module in [
            (bart_layer.self_attn.q_proj, attention.self.query),
            (bart_layer.self_attn.k_proj, attention.self.key),
            (bart_layer.self_attn.v_proj, attention.self.value),
            (bart_layer.self_attn.out_proj, attention.output.dense),
            (bart_layer.self_attn_layer_norm, attention.output.LayerNorm),
            (bart_layer.fc1, bert_layer.intermediate.dense),
            (bart_layer.fc2, bert_layer.output.dense),
            (bart_layer.final_layer_norm, bert_layer.output.LayerNorm),
        ]:
            bart_module.load_state_dict(bert_module.state_dict())


def build_seq2seq_student(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                          shape: Seq2SeqShape) -> BartForConditionalGeneration:
    """A BART student of ``shape`` over the teacher's vocabulary. ``teacher`` is any BERT model (``BertModel``,
    ``BertForMaskedLM``, a classifier): its base model is what is copied.

    With ``init: teacher`` the encoder takes the teacher's embeddings and its first
    min(``encoder_layers``, teacher layers) blocks, bottom up, so the copied stack stays contiguous and each
    block reads the states it was trained on; blocks beyond the teacher's depth start at random. The widths
    (d_model, heads, ffn_dim) must be the teacher's: a narrower student has nothing to copy into, and is
    refused rather than silently left random.
    """
    if shape.init == "teacher" and (mismatches := _width_mismatches(teacher.config, shape)):
        raise ValueError("init 'teacher' needs the teacher's widths: " + "; ".join(mismatches))
    student = BartForConditionalGeneration(seq2seq_config(teacher.config, tokenizer, shape))
    if shape.init == "teacher":
        _copy_teacher_encoder(student, teacher.base_model)
    return student
