"""General (task-agnostic) distillation: a student encoder learns the teacher encoder on unlabelled text, before
any task-specific method trains it (TinyBERT's general distillation, DistilBERT's pre-training distillation).

The objective is a sum of weighted terms, each off at weight 0:

    L = w_e · MSE(E_s W_e, E_t) + Σ_m [ w_a · MSE(A_s,m, A_t,g(m)) + w_h · MSE(H_s,m W_h, H_t,g(m)) ]   (TinyBERT)
      + w_cos · mean_tokens(1 − cos(h_s W_h, h_t))                                                 (DistilBERT)
      + w_mlm · CE(y, head(h_s W_h)) + w_soft · T² · CE(softmax(z_t/T), softmax(head(h_s W_h)/T))   (DistilBERT)

with the TinyBERT terms exactly those of its intermediate phase (``kd.methods.tinybert.intermediate_terms``),
h the last hidden states, and the masked-LM terms read at the masked positions of BERT's 15% masking, which both
models then see. The masked-LM head is the masked-LM teacher's: frozen for the teacher's side, a trained copy
for the student's, reading the student's states lifted to the teacher's width, as ``kd.methods.distilbert`` does.

Text arrives as a stream of sentences (``TrainIO.epoch_chunks`` with a ``text`` column), is packed into blocks of
whole sentences up to ``max_length`` tokens, and training is counted in optimiser steps, not epochs: a corpus
larger than the budget is never read to its end, and a small one is read again with a new order. Every
``checkpoint_every`` steps the run reports and checkpoints, with each worker's place in its stream, so a
restarted run resumes at the first sentence it had not trained on.

Pure PyTorch and transformers; ``stages.general`` runs it on Ray Train.
"""

from __future__ import annotations

import itertools
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedTokenizerBase

from kd.attention import SCORES_ATTENTION
from kd.checkpoints import load_classifier, load_tokenizer
from kd.layer_maps import LayerMatch, expand_strategy
from kd.layout import ENCODER_DIR, HISTORY_FILE
from kd.losses import get_loss, soft_cross_entropy
from kd.methods.base import Method, MethodParams, Phase
from kd.methods.distilbert import MaskedLMHead, mask_tokens
from kd.methods.tinybert import intermediate_terms
from kd.precision import PrecisionSetting
from kd.projections import hidden_width, width_projections
from kd.students import StudentShape, build_student
from kd.training import Distiller, TrainSettings
from kd.worker import fail_if_injected, fault_injection

TEXT = "text"
POSITIONS_FILE = "positions.json"  # in a checkpoint: each worker's place in its stream, by rank
GENERAL_PHASE = "general"
MLM_LABELS = "mlm_labels"
IGNORE_INDEX = -100


class GeneralLosses(MethodParams):
    """Weights of the general-distillation terms; 0 turns a term off (and skips the work it needs)."""

    embedding: float = Field(default=1.0, ge=0, description="TinyBERT: MSE of the embedding outputs, through W_e.")
    attention: float = Field(default=1.0, ge=0, description="TinyBERT: MSE of mapped layers' attention scores.")
    hidden: float = Field(default=1.0, ge=0, description="TinyBERT: MSE of mapped layers' hidden states, through W_h.")
    cosine: float = Field(default=0.0, ge=0, description="DistilBERT: 1 − cos of the last hidden states.")
    mlm: float = Field(default=0.0, ge=0, description="DistilBERT: the student's masked-LM cross-entropy.")
    soft_mlm: float = Field(default=0.0, ge=0, description="DistilBERT: T² · CE to the masked-LM teacher's "
                            "distribution at the masked positions.")
    temperature: float = Field(default=2.0, gt=0, description="T of soft_mlm (DistilBERT: 2).")
    strategy: Literal["uniform", "top", "bottom"] = Field(
        default="uniform", description="Which teacher layer each student layer learns from (TinyBERT: uniform).")

    @model_validator(mode="after")
    def _some_term(self) -> "GeneralLosses":
        if not any((self.embedding, self.attention, self.hidden, self.cosine, self.mlm, self.soft_mlm)):
            raise ValueError("every loss weight is 0: give at least one term a weight")
        return self

    @property
    def masked(self) -> bool:
        """The masked-LM terms are on: the batch is masked for both models, and a masked-LM head is needed."""
        return self.mlm > 0 or self.soft_mlm > 0


class GeneralSettings(BaseModel):
    """How long and how a general distillation trains."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=2000, ge=1, description="Optimiser steps, summed over the workers' batches.")
    batch_size: int = Field(default=32, ge=1, description="Packed blocks per worker and step.")
    max_length: int = Field(default=128, ge=8, le=4096, description="Tokens per block, [CLS] and [SEP] included.")
    learning_rate: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=200, ge=1, description="Steps between checkpoints (and resumable points).")
    report_every: int = Field(default=50, ge=1, description="Steps between progress lines.")
    rows_per_chunk: int = Field(default=2048, ge=1, description="Sentences shuffled together in the stream.")
    precision: PrecisionSetting = "auto"
    seed: int = 0

    @property
    def segments(self) -> int:
        return math.ceil(self.steps / self.checkpoint_every)

    @property
    def steps_per_segment(self) -> int:
        """Steps between checkpoints, evened out so that the segments add up to ``steps`` or just past it."""
        return math.ceil(self.steps / self.segments)

    def train_settings(self) -> TrainSettings:
        """The loop's settings: one 'epoch' of ``kd.training.Distiller`` is one segment between checkpoints."""
        return TrainSettings(epochs=self.segments, batch_size=self.batch_size, learning_rate=self.learning_rate,
                             weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                             max_grad_norm=self.max_grad_norm, report_every=self.report_every,
                             precision=self.precision, bucket_batches=1, seed=self.seed)


def general_matches(losses: GeneralLosses, n_teacher: int, n_student: int) -> list[LayerMatch]:
    """TinyBERT's layer-to-layer terms that are on: the embedding pair (0, 0), then an attention and a hidden pair
    per student layer by ``losses.strategy``."""
    matches = [LayerMatch(student_layer=0, teacher_layer=0, feature="embedding", loss="mse")] if losses.embedding else []
    for feature, weight in (("attention", losses.attention), ("hidden", losses.hidden)):
        if weight:
            matches += expand_strategy(losses.strategy, n_teacher, n_student, feature=feature, loss="mse")
    return matches


class GeneralDistillation(Method):
    """The general-distillation objective (module docstring) as a ``kd.methods.base.Method`` that
    ``kd.training.Distiller`` runs; not registered: it trains encoders, not task students."""

    name = "general"
    Params = GeneralLosses

    def __init__(self, params: GeneralLosses | dict | None = None, mlm_head: str | None = None):
        super().__init__(params)
        self.mlm_head = mlm_head
        if self.params.masked and mlm_head is None:
            raise ValueError("the masked-LM terms need the masked-LM teacher's head (mlm_head)")
        # What the models must return depends on the terms that are on: attention scores cost the eager path.
        outputs = {"hidden_states"} | ({"attentions"} if self.params.attention > 0 else set())
        self.online_signals = frozenset(outputs)
        self.student_outputs = frozenset(outputs)

    def phases(self) -> list[Phase]:
        return [Phase(GENERAL_PHASE)]

    def layer_matches(self, n_teacher: int, n_student: int) -> list[LayerMatch]:
        return general_matches(self.params, n_teacher, n_student)

    def auxiliary_modules(self, student, teacher):
        modules = width_projections(student, teacher, ["embedding", "hidden"])
        if self.params.masked:
            width = hidden_width(teacher)
            modules["mlm"] = MaskedLMHead.from_pretrained(self.mlm_head, student, width, seed=0)
            teacher_head = MaskedLMHead.from_pretrained(self.mlm_head, student, width, seed=0)
            modules["teacher_mlm"] = teacher_head.requires_grad_(False)
        return modules

    def student_forward(self, student, batch, auxiliary, phase):
        return student.base_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                                  output_hidden_states=True,
                                  output_attentions="attentions" in self.student_outputs)

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        p = self.params
        token_mask = batch["attention_mask"]
        matches = self.layer_matches(len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1)
        terms = intermediate_terms(matches, student_out, teacher_out, auxiliary, token_mask)
        student_last = auxiliary["hidden"](student_out.hidden_states[-1])
        teacher_last = teacher_out.hidden_states[-1]
        if p.cosine:
            terms["cosine"] = get_loss("cos")(student_last, teacher_last, token_mask)
        if p.masked:
            chosen = batch[MLM_LABELS] != IGNORE_INDEX
            student_logits = auxiliary["mlm"](student_last[chosen])
            if p.mlm:
                terms["mlm"] = (F.cross_entropy(student_logits, batch[MLM_LABELS][chosen])
                                if chosen.any() else student_logits.sum() * 0)
            if p.soft_mlm:
                with torch.no_grad():
                    teacher_logits = auxiliary["teacher_mlm"](teacher_last[chosen])
                terms["soft_mlm"] = (soft_cross_entropy(student_logits, teacher_logits, p.temperature)
                                     if chosen.any() else student_logits.sum() * 0)
        weights = {"embedding": p.embedding, "attention": p.attention, "hidden": p.hidden, "cosine": p.cosine,
                   "mlm": p.mlm, "soft_mlm": p.soft_mlm}
        total = sum(weights[name] * value for name, value in terms.items())
        return {**{name: value for name, value in terms.items() if weights[name]}, "total": total}


# --- the text stream ----------------------------------------------------------------------------------------


class SentencePacker:
    """Blocks of whole consecutive sentences, ``[CLS] s_i s_i+1 … [SEP]`` up to ``max_length`` tokens (a longer
    sentence is cut to fit a block of its own). Whole sentences only, so that after each block the number of
    sentences consumed is exact: a resumed stream starts with the first sentence no block has held."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer = tokenizer
        self.room = max_length - 2

    def blocks(self, chunks: Iterable[list[str]]) -> Iterator[tuple[list[int], int]]:
        """(block ids, sentences consumed once the block is out) for chunks of sentences, in order."""
        block: list[int] = []
        consumed = 0
        for texts in chunks:
            encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.room)
            for ids in encoded["input_ids"]:
                if block and len(block) + len(ids) > self.room:
                    yield self._framed(block), consumed
                    block = []
                block.extend(ids)
                consumed += 1
        if block:
            yield self._framed(block), consumed

    def _framed(self, ids: list[int]) -> list[int]:
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]


def collate_blocks(blocks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(block) for block in blocks)
    input_ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for row, block in enumerate(blocks):
        input_ids[row, :len(block)] = torch.tensor(block)
        attention_mask[row, :len(block)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


class BlockStream:
    """One worker's endless stream of batches: pass after pass over its shard, each pass in the order of its own
    seed (seed, rank, pass), from a saved position onwards. ``position`` is where the next batch starts."""

    def __init__(self, io, packer: SentencePacker, settings: GeneralSettings, rank: int, masked: bool,
                 tokenizer: PreTrainedTokenizerBase, position: dict | None = None):
        self.io, self.packer, self.settings, self.rank = io, packer, settings, rank
        self.masked, self.tokenizer = masked, tokenizer
        self.special_ids = torch.tensor(tokenizer.all_special_ids)  # never masked; built once, not every step
        self.position = dict(position or {"pass": 0, "rows": 0})
        self.sentences = 0  # sentences consumed by this worker since the stream was made
        self.tokens = 0  # real tokens in its batches

    def _pass_chunks(self, pass_index: int, skip: int) -> Iterator[list[str]]:
        seed = int(np.random.SeedSequence([self.settings.seed, self.rank, pass_index]).generate_state(1)[0])
        read = 0
        for rows in self.io.epoch_chunks(self.settings.rows_per_chunk, seed):
            texts = [str(text) for text in rows[TEXT]]
            read += len(texts)
            if skip >= len(texts):
                skip -= len(texts)
                continue
            yield texts[skip:]
            skip = 0
        if read == 0:
            # Checked here, where the stream is read: a check on the driver (take(1)) stops Ray Data with tasks in
            # flight, and their cancellation prints an error from Ray's own signal handling.
            raise ValueError(f"worker {self.rank}: the corpus gave this worker no text (its source is empty, "
                             "or its text column holds only blank values)")

    def _mask(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        # Seeded by (seed, rank, step), so a resumed run masks each step as the uninterrupted run would.
        seed = int(np.random.SeedSequence([self.settings.seed, self.rank, step, 1]).generate_state(1)[0])
        masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.special_ids,
                                     self.tokenizer.mask_token_id, len(self.tokenizer),
                                     torch.Generator().manual_seed(seed))
        return {**batch, "input_ids": masked, MLM_LABELS: labels}

    def batches(self, first_step: int) -> Iterator[dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id
        step = first_step
        for pass_index in itertools.count(self.position["pass"]):
            skip = self.position["rows"] if pass_index == self.position["pass"] else 0
            pending: list[list[int]] = []
            produced = False
            for block, consumed in self.packer.blocks(self._pass_chunks(pass_index, skip)):
                pending.append(block)
                if len(pending) < self.settings.batch_size:
                    continue
                batch = collate_blocks(pending, pad)
                self.tokens += int(batch["attention_mask"].sum())
                self.sentences += skip + consumed - self.position["rows"]
                self.position = {"pass": pass_index, "rows": skip + consumed}
                pending, produced = [], True
                yield self._mask(batch, step) if self.masked else batch
                step += 1
            if not produced and skip == 0:
                raise ValueError(f"worker {self.rank}: a whole pass over its share of the corpus gave fewer than "
                                 f"{self.settings.batch_size} blocks of {self.settings.max_length} tokens; use a "
                                 "larger corpus, a smaller batch_size, or fewer workers")
            # The blocks of an unfinished batch at a pass's end are dropped: the next pass starts afresh.
            self.position = {"pass": pass_index + 1, "rows": 0}


# --- one worker's run ---------------------------------------------------------------------------------------


def general_job(*, teacher: str, mlm_head: str | None, shape: dict, losses: dict, settings: dict,
                torch_threads: int) -> dict[str, Any]:
    """What a worker needs, as plain data: the teacher encoder's folder (its tokenizer beside it), the masked-LM
    teacher's folder when the masked-LM terms are on, the student's shape, the loss weights and the settings."""
    return {"teacher": teacher, "mlm_head": mlm_head, "shape": shape, "losses": losses, "settings": settings,
            "torch_threads": torch_threads, **fault_injection()}


def build_general(job: dict[str, Any], io) -> tuple[Distiller, PreTrainedTokenizerBase]:
    settings = GeneralSettings.model_validate(job["settings"])
    objective = GeneralDistillation(job["losses"], mlm_head=job["mlm_head"])
    attentions = "attentions" in objective.online_signals
    # A classifier with a head it never trains: the student is built as every task student is (kd.students), and
    # only its encoder is saved.
    teacher = load_classifier(job["teacher"], num_labels=2, attentions=attentions)
    student = build_student(teacher, StudentShape.model_validate(job["shape"]))
    if attentions:
        student.set_attn_implementation(SCORES_ATTENTION)
    device = io.device()
    distiller = Distiller(objective, student, teacher.base_model, settings.train_settings(),
                          settings.steps_per_segment, device, wrap=lambda module: io.wrap(module, device))
    return distiller, load_tokenizer(job["teacher"])


def save_encoder(distiller: Distiller, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    distiller.student.base_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far: a stream that keeps memory flat shows it level off."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # kilobytes on Linux, bytes on macOS


def gathered(value: Any, world: int) -> list[Any]:
    """``value`` from every worker, by rank (just this one outside data-parallel training)."""
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def train_general(job: dict[str, Any], io, verbose: bool = True) -> Distiller:
    """Distil the teacher encoder into the student over ``settings.steps`` steps, reporting and checkpointing
    every ``checkpoint_every`` steps (the checkpoint holds the encoder as it stands, in ``ENCODER_DIR``)."""
    torch.set_num_threads(job["torch_threads"])
    settings = GeneralSettings.model_validate(job["settings"])
    torch.manual_seed(settings.seed)
    distiller, tokenizer = build_general(job, io)
    positions = None
    with io.restore() as directory:
        if directory is not None:
            distiller.load_state(directory)
            distiller.progress.history = json.loads((directory / HISTORY_FILE).read_text())
            distiller.progress.history.append({"event": "restored", "step": distiller.progress.global_step})
            positions = json.loads((directory / POSITIONS_FILE).read_text())
    stream = BlockStream(io, SentencePacker(tokenizer, settings.max_length), settings, io.rank,
                         distiller.method.params.masked, tokenizer,
                         positions[io.rank] if positions is not None else None)
    batches = stream.batches(distiller.progress.global_step)
    rank0 = io.rank == 0
    if rank0 and verbose:
        print(f"precision {distiller.precision_reason}", flush=True)

    def on_progress(metrics: dict) -> None:
        distiller.progress.history.append(metrics)
        if rank0:
            line = f"[general] step {metrics['step']}/{settings.steps} loss {metrics['loss/total']:.4f}"
            io.progress(line)
            if verbose:
                print(line, flush=True)
        fail_if_injected(job, distiller.progress.global_step, io.rank)

    while not distiller.finished:
        remaining = settings.steps - distiller.progress.global_step
        started = time.perf_counter()
        sentences_before, tokens_before = stream.sentences, stream.tokens
        losses = distiller.run_epoch(itertools.islice(batches, min(settings.steps_per_segment, remaining)),
                                     on_progress)
        seconds = time.perf_counter() - started
        sentences = sum(gathered(stream.sentences - sentences_before, io.world))
        tokens = sum(gathered(stream.tokens - tokens_before, io.world))
        record = {"step": distiller.progress.global_step, "seconds": seconds, **losses,
                  "sentences_per_second": sentences / seconds, "tokens_per_second": tokens / seconds,
                  "peak_rss_mb": max(gathered(peak_rss_mb(), io.world))}
        distiller.progress.history.append(record)
        positions = gathered(stream.position, io.world)
        with tempfile.TemporaryDirectory() as scratch:
            if rank0:
                distiller.save_state(scratch)
                save_encoder(distiller, tokenizer, Path(scratch) / ENCODER_DIR)
                (Path(scratch) / POSITIONS_FILE).write_text(json.dumps(positions))
                (Path(scratch) / HISTORY_FILE).write_text(json.dumps(distiller.progress.history))
            io.report(record, Path(scratch) if rank0 else None)
    return distiller
