"""Generation students (``task.task_type: seq2seq``): a BART student over the teacher's vocabulary
(``kd.models.seq2seq``) learns a source → target mapping, from gold targets alone (``nll``, the baseline) or from
a C-MLM teacher's top-k distribution at each target token as well (``cmlm``, Chen et al. 2020; ``kd.cmlm``).

The teacher folder is a C-MLM teacher (stage ``cmlm_teacher``: a ``BertForMaskedLM`` with its tokenizer). It
lends the student its vocabulary and tokenizer and, with ``init: teacher``, its embeddings and first layers as
the student's encoder; ``cmlm`` reads its readings from the Parquet of stage ``cmlm_topk`` (``cmlm_topk_ids``,
``cmlm_topk_probs``), never the teacher itself.
"""

from __future__ import annotations

from pydantic import Field
from transformers import PretrainedConfig, PreTrainedModel

from kd.batching import length_bucketed
from kd.cmlm import (
    SOURCE,
    TARGET,
    TOPK_IDS,
    TOPK_PROBS,
    PairCollator,
    cmlm_loss,
    decoder_inputs,
    teacher_forced_metrics,
    token_nll,
)
from kd.methods.base import Method, MethodParams, register_method
from kd.mlm import masked_lm_from
from kd.models.seq2seq import Seq2SeqShape, build_seq2seq_student
from kd.students import StudentShape

SEQ2SEQ = "seq2seq"


class Seq2SeqParams(MethodParams):
    decoder_layers: int | None = Field(
        default=None, ge=1, description="Decoder blocks; None: as many as the encoder's (student.layers).")
    # The C-MLM stages' defaults (stages/cmlm_teacher.py, stages/cmlm_topk.py): the student must cut pairs as
    # the top-k stage did, or its readings land on other tokens (the collator refuses rows where they differ).
    max_source_length: int = Field(default=64, ge=1, description="Source word pieces kept.")
    max_target_length: int = Field(default=64, ge=1, description="Target word pieces kept (labels: these + [SEP]).")


def seq2seq_shape(shape: StudentShape, teacher_config: PretrainedConfig,
                  decoder_layers: int | None = None) -> Seq2SeqShape:
    """The entry's ``student`` block as the BART student's shape: ``layers`` encoder blocks, ``decoder_layers``
    decoder blocks (None: ``layers``), d_model = ``hidden_size`` and ffn_dim = ``intermediate_size``; as for a
    BERT student (``kd.students.student_config``), widths left out are the teacher's, or at another hidden size
    the teacher's head size and 4 × hidden_size. ``init: random`` starts at random; any other init (None
    included) is ``teacher``: the encoder copies the teacher's embeddings and first layers."""
    teacher_width = teacher_config.hidden_size
    d_model = shape.hidden_size or teacher_width
    if d_model == teacher_width:
        heads = shape.attention_heads or teacher_config.num_attention_heads
        ffn_dim = shape.intermediate_size or teacher_config.intermediate_size
    else:
        head_dim = teacher_width // teacher_config.num_attention_heads
        heads = shape.attention_heads or max(1, d_model // head_dim)
        ffn_dim = shape.intermediate_size or 4 * d_model
    return Seq2SeqShape(encoder_layers=shape.layers, decoder_layers=decoder_layers or shape.layers, d_model=d_model,
                        heads=heads, ffn_dim=ffn_dim, init="random" if shape.init == "random" else "teacher")


class Seq2SeqMethod(Method):
    """What ``nll`` and ``cmlm`` share: the BART student, its batches of pairs, teacher forcing, and dev metrics
    under teacher forcing."""

    Params = Seq2SeqParams
    task_types = frozenset({SEQ2SEQ})
    family = SEQ2SEQ
    copies_layers = False
    # The encoder copies the C-MLM teacher's first blocks, or (pretrained) those of the checkpoint it was fine-tuned
    # from: the baseline a user would train without a teacher (stages.distill.layer_source).
    own_kind_init_from = frozenset({"teacher", "pretrained"})
    bert_student = False
    # The encoder copies the teacher's first blocks (kd.models.seq2seq): the "bottom" strategy.
    default_init = "bottom"

    def __init__(self, params=None):
        super().__init__(params)
        self.tokenizer = None  # the teacher's, once ``student_tokenizer`` has been given it

    def problems(self, where, spec, experiment):
        problems = []  # the task type is checked for every method (task_types)
        init = spec.student.init
        if init not in (None, "bottom", "random"):
            problems.append(f"{where}.student.init: a seq2seq student's encoder starts from the teacher's first "
                            f"layers (leave init out, or bottom) or at random (random), not {init!r}")
        for length in ("max_source_length", "max_target_length"):
            ours, shared = getattr(spec.params, length), getattr(experiment.cmlm, length)
            if ours != shared:
                problems.append(f"{where}.params.{length}: {ours}, but cmlm.{length} is {shared}; the student must "
                                "cut pairs as the C-MLM stages do (leave it out of params, or set both alike)")
        return problems

    def load_model(self, source, num_labels, attentions=False) -> PreTrainedModel:
        """The C-MLM teacher: a masked LM (any BERT folder loads; ``num_labels`` does not apply)."""
        return masked_lm_from(source)

    def student_tokenizer(self, teacher_tokenizer, train_texts):
        """The teacher's: its soft targets are distributions over its ids. Kept for ``build_student``, which
        gives BERT's special tokens BART's roles."""
        self.tokenizer = teacher_tokenizer
        return teacher_tokenizer

    def shape(self, shape: StudentShape, teacher_config: PretrainedConfig) -> Seq2SeqShape:
        return seq2seq_shape(shape, teacher_config, self.params.decoder_layers)

    def check_teacher(self, shape, teacher_config):
        student = self.shape(shape, teacher_config)
        widths = {"hidden_size": (student.d_model, teacher_config.hidden_size),
                  "attention_heads": (student.heads, teacher_config.num_attention_heads),
                  "intermediate_size": (student.ffn_dim, teacher_config.intermediate_size)}
        differ = [f"{name} {ours} ≠ teacher's {theirs}" for name, (ours, theirs) in widths.items() if ours != theirs]
        if student.init == "teacher" and differ:
            raise ValueError(f"student: an encoder copied from the teacher needs its widths ({'; '.join(differ)}); "
                             "set student.init: random, or leave the widths out")

    def build_student(self, teacher, shape):
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: call student_tokenizer before build_student (it needs the special tokens)")
        student = build_seq2seq_student(teacher, self.tokenizer, self.shape(shape, teacher.config))
        return student

    def collator(self, student_tokenizer, teacher_tokenizer, max_length, regression, seed):
        """``kd.cmlm.PairCollator`` at the params' lengths; ``max_length`` (the classifier teacher's) and
        ``regression`` do not apply."""
        return PairCollator(student_tokenizer, self.params.max_source_length, self.params.max_target_length,
                            k=self.topk())

    def topk(self) -> int | None:
        """Top-k ids per target token the loss reads; None: no readings."""
        return None

    def training_batches(self, chunks, batch_size, rng):
        return length_bucketed(chunks, batch_size, rng, text_columns=(SOURCE, TARGET))

    def student_forward(self, student, batch, auxiliary, phase):
        """Teacher forcing: the decoder reads the gold labels shifted right (``kd.cmlm.decoder_inputs``, BART's own
        shift), so the logits at label position t are p_student(·|source, target<t)."""
        return student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_inputs(student, batch["labels"]))

    def dev_metrics(self, model, collator, rows, regression):
        """``token_accuracy`` and ``nll`` on dev under teacher forcing (``kd.cmlm.teacher_forced_metrics``): one
        forward pass per batch, cheap enough for every epoch. BLEU and ROUGE need decoding and are measured by
        the evaluation stage, not per epoch."""
        return teacher_forced_metrics(model, collator, rows)

    def selection_metric(self, regression):
        return "token_accuracy"


@register_method
class Nll(Seq2SeqMethod):
    """The generation baseline: L = NLL(target), the student trained on gold targets alone."""

    name = "nll"

    def is_baseline(self) -> bool:
        return True

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        nll = token_nll(student_out.logits, batch["labels"])
        return {"nll": nll, "total": nll}


class CmlmParams(Seq2SeqParams):
    # Chen et al.'s released training command (ChenRocks/Distill-BERT-Textgen, README: --kd_alpha 0.5
    # --kd_temperature 10.0 --kd_topk 8).
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD term; 1 − α goes to the NLL.")
    temperature: float = Field(
        default=10.0, gt=0, description="T of the student's softmax in the KD term; must be the temperature the "
        "cmlm_topk stage read the teacher at (it stores softmax(z / T) over the top-k).")
    k: int = Field(default=8, ge=1, description="Teacher ids per target token; the cmlm_topk stage must store at "
                   "least k (a larger stored k keeps its first k).")


@register_method
class Cmlm(Seq2SeqMethod):
    """C-MLM distillation (Chen et al. 2020): L = α · KD + (1 − α) · NLL (``kd.cmlm.cmlm_loss``), KD being the
    student's T²-scaled cross-entropy against the C-MLM teacher's top-k distribution at each target token (the
    final [SEP] has none and learns from the NLL alone)."""

    name = "cmlm"
    Params = CmlmParams
    cached_signals = frozenset({"cmlm_topk"})

    def topk(self) -> int:
        return self.params.k

    def problems(self, where, spec, experiment):
        problems = super().problems(where, spec, experiment)
        readings = experiment.cmlm
        if spec.params.k > readings.k:
            problems.append(f"{where}.params.k: {spec.params.k}, but the cmlm_topk stage keeps cmlm.k = {readings.k} "
                            "ids per target token; raise cmlm.k or lower k")
        if spec.params.temperature != readings.temperature:
            problems.append(f"{where}.params.temperature: {spec.params.temperature:g}, but the teacher is read at "
                            f"cmlm.temperature = {readings.temperature:g}; the KD term needs the same T on both sides")
        return problems

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        missing = [key for key in (TOPK_IDS, TOPK_PROBS) if key not in batch]
        if missing:
            raise KeyError(f"cmlm needs the C-MLM teacher's top-k in the batch (columns cmlm_topk_ids and "
                           f"cmlm_topk_probs of stage cmlm_topk); missing {missing}")
        p = self.params
        return cmlm_loss(student_out.logits, batch["labels"], batch[TOPK_IDS], batch[TOPK_PROBS], p.alpha,
                         p.temperature)
