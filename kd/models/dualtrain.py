"""Mixed-vocabulary distillation (Zhao et al., 2020, "Extremely small BERT models from mixed-vocabulary
training"): DualTrain and SharedProj, as this pipeline implements them.

Vocabulary. The student has its own, much smaller WordPiece vocabulary (``train_wordpiece``; the paper's is about
5K pieces against BERT's 30K), so its word-embedding table, the bulk of a small BERT's parameters, shrinks with it.

Dual training. Each word of a training sentence is segmented by the teacher's vocabulary with probability
p_teacher, else by the student's (``dual_segmentation``). The student reads this mixed sequence: a student piece
keeps its student id s, a teacher piece t gets the offset id t + V_s (V_s the student model's vocabulary size).
The student's embedding table in this mode is therefore the concatenation

    E_mixed = [ E_s ; E_t P ]        E_s ∈ R^{V_s×d_s} trained,  E_t ∈ R^{V_t×d_t} the teacher's, frozen,

with P the shared projection's map from teacher to student width, U or Uᵀ below (``mixed_inputs_embeds``). A student
word piece thus learns in contexts where its neighbours are the teacher's well-trained pieces, which is how the
paper aligns the two vocabularies. Where the paper feeds the mixed sequence to the teacher (and trains the teacher
on it), here the teacher stays frozen and reads its own segmentation; the student alone reads the mixed one, and
after training it keeps E_s only: at inference it reads pure student-vocabulary ids.

Shared projection. ONE trainable matrix U aligns the models' widths for every layer (``SharedProjection``):
"down" maps teacher states to the student's width (U ∈ R^{d_t×d_s}, compare in student space), "up" maps student
states to the teacher's (U ∈ R^{d_s×d_t}, compare in teacher space). The paper projects the layers' weights; this
pipeline aligns their outputs, as the design allows, so

    down: Σ_m MSE(H_s,m, H_t,g(m) U)            up: Σ_m MSE(H_s,m U, H_t,g(m))

over a uniform layer map g. U starts as a truncated identity, which is semi-orthogonal (U Uᵀ = I on the smaller
side); teacher pieces enter the mixed embedding through U itself (down) or through Uᵀ (up), which at the start
is a left inverse of the up map by that semi-orthogonality, so either direction trains one matrix.

Alignment. The two models read different segmentations of the same sentence, so their sequences differ in length.
Hidden states are compared per *unit*: [CLS], each word and each [SEP]. A sequence position carries the index of
its unit (``unit_ids``, −1 for padding), and each side's states are averaged over the pieces of a unit
(``pool_units``) before the MSE. ``dual_batch`` builds both sides of a batch with matching units.

Sentences are split into words by the teacher tokenizer's normaliser and pre-tokeniser (BERT's: whitespace and
punctuation); both tokenizers then segment the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kd.batching import TEXT_A, TEXT_B, Collator, as_strings
from kd.students import parameter_counts

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
Direction = Literal["down", "up"]

# Batch keys: the teacher's segmentation sits under the plain model-input names (the training loop feeds those to
# the teacher), the student's mixed one under student_*; unit ids align the two.
STUDENT_PREFIX = "student_"
UNIT_IDS = "unit_ids"
STUDENT_INPUT_IDS = STUDENT_PREFIX + "input_ids"
STUDENT_ATTENTION_MASK = STUDENT_PREFIX + "attention_mask"
STUDENT_TOKEN_TYPE_IDS = STUDENT_PREFIX + "token_type_ids"
STUDENT_UNIT_IDS = STUDENT_PREFIX + UNIT_IDS


class RandomSource(Protocol):
    """A source of uniform draws in [0, 1): ``random.Random`` or a numpy ``Generator``."""

    def random(self) -> float: ...


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``texts``: BERT's normaliser and pre-tokeniser, "##"
    continuation pieces, [PAD] [UNK] [CLS] [SEP] [MASK] as ids 0-4, inputs laid out as [CLS] a [SEP] (b [SEP]) with
    token types. The vocabulary holds at most ``vocab_size`` entries (every character seen is kept, so it can hold
    more when the corpus has more distinct characters). It saves with ``save_pretrained``.

    Training is not reproducible across processes when merges tie: the tokenizers library numbers the "##" pieces
    in hash-map order and breaks ties by those numbers (huggingface/tokenizers#1794). Train the vocabulary once and
    keep the saved tokenizer with the student; do not retrain it to read the student's inputs."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##", show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", do_lower_case=lowercase,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def split_words(text: str, tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """The words of ``text`` as ``tokenizer`` sees them: normalised, then pre-tokenised."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is None:
        return text.split()
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


Pieces = list[list[tuple[str, int]]]  # per word, its (token, id) pieces


def word_pieces(words: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> Pieces:
    """Each word's segmentation by ``tokenizer``, as (token, id) pairs."""
    pieces: Pieces = [[] for _ in words]
    if not words:
        return pieces
    encoding = tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)
    for token, token_id, word in zip(encoding.tokens(), encoding["input_ids"], encoding.word_ids()):
        pieces[word].append((token, token_id))
    return pieces


@dataclass
class DualSegmentation:
    """A mixed segmentation: per piece its token, its id in its own vocabulary, whether that vocabulary is the
    teacher's, and the index of the word it belongs to."""

    tokens: list[str]
    ids: list[int]
    from_teacher: list[bool]
    word_ids: list[int]

    def mixed_ids(self, student_vocab_size: int) -> list[int]:
        """Ids in the student's mixed table: student ids as they are, teacher ids + V_s."""
        return [i + student_vocab_size if teacher else i for i, teacher in zip(self.ids, self.from_teacher)]


def choose_segmentation(
    teacher_pieces: Pieces, student_pieces: Pieces, p_teacher: float, rng: RandomSource
) -> DualSegmentation:
    """Per word, the teacher's pieces with probability ``p_teacher``, else the student's."""
    segmentation = DualSegmentation([], [], [], [])
    for word, (teacher, student) in enumerate(zip(teacher_pieces, student_pieces)):
        use_teacher = rng.random() < p_teacher
        for token, token_id in teacher if use_teacher else student:
            segmentation.tokens.append(token)
            segmentation.ids.append(token_id)
            segmentation.from_teacher.append(use_teacher)
            segmentation.word_ids.append(word)
    return segmentation


def dual_segmentation(
    words: Sequence[str],
    teacher_tokenizer: PreTrainedTokenizerFast,
    student_tokenizer: PreTrainedTokenizerFast,
    p_teacher: float,
    rng: RandomSource,
) -> DualSegmentation:
    """DualTrain's input: each word segmented by the teacher's vocabulary with probability ``p_teacher`` (a draw
    ``rng.random() < p_teacher`` per word, so 1 gives exactly the teacher's pieces and 0 exactly the student's),
    else by the student's. ``rng`` is a ``random.Random`` or a numpy ``Generator``."""
    return choose_segmentation(word_pieces(words, teacher_tokenizer), word_pieces(words, student_tokenizer),
                               p_teacher, rng)


def _sequence_length(pieces: list[list[int]], bounds: list[list[int]]) -> int:
    """[CLS] + each segment's kept words' pieces + its [SEP]."""
    return 1 + sum(1 + sum(len(pieces[word]) for word in range(start, end)) for start, end in bounds)


def _layout(pieces: list[list[int]], bounds: list[list[int]], cls: int, sep: int) -> tuple[list[int], ...]:
    """(ids, token types, unit ids) of [CLS] a [SEP] (b [SEP]) for the words in ``bounds`` ([start, end) per
    segment); units count [CLS], then every kept word and [SEP] in order, whatever their pieces."""
    ids, types, units = [cls], [0], [0]
    unit = 1
    for segment, (start, end) in enumerate(bounds):
        for word in range(start, end):
            ids += pieces[word]
            types += [segment] * len(pieces[word])
            units += [unit] * len(pieces[word])
            unit += 1
        ids.append(sep)
        types.append(segment)
        units.append(unit)
        unit += 1
    return ids, types, units


def dual_batch(
    examples: Sequence[str | tuple[str, str]],
    teacher_tokenizer: PreTrainedTokenizerFast,
    student_tokenizer: PreTrainedTokenizerFast,
    p_teacher: float,
    rng: RandomSource,
    student_vocab_size: int,
    max_length: int = 128,
    labels: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Both sides of a DualTrain batch from sentences (or sentence pairs), right-padded.

    The teacher's segmentation fills input_ids / attention_mask / token_type_ids / unit_ids; the student's mixed
    one (ids in the mixed table, ``student_vocab_size`` = the student model's V_s) fills the student_* keys. The
    units are the same on both sides. Words are dropped from the end of the segment with the most words until both
    sides fit ``max_length``.
    """
    if len(student_tokenizer) > student_vocab_size:
        raise ValueError(f"the student tokenizer has {len(student_tokenizer)} pieces but the student's table only "
                         f"{student_vocab_size}: build the student with the tokenizer's size")
    sides = {"": (teacher_tokenizer, []), STUDENT_PREFIX: (student_tokenizer, [])}
    for example in examples:
        texts = [example] if isinstance(example, str) else list(example)
        segments = [split_words(text, teacher_tokenizer) for text in texts]
        words = [word for segment in segments for word in segment]
        teacher = word_pieces(words, teacher_tokenizer)
        mixed = choose_segmentation(teacher, word_pieces(words, student_tokenizer), p_teacher, rng)
        teacher_ids = [[token_id for _, token_id in pieces] for pieces in teacher]
        student_ids: list[list[int]] = [[] for _ in words]
        for word, token_id in zip(mixed.word_ids, mixed.mixed_ids(student_vocab_size)):
            student_ids[word].append(token_id)
        offsets = [0]
        for segment in segments:
            offsets.append(offsets[-1] + len(segment))
        bounds = [[start, end] for start, end in zip(offsets, offsets[1:])]
        while max(_sequence_length(teacher_ids, bounds), _sequence_length(student_ids, bounds)) > max_length:
            longest = max(bounds, key=lambda b: b[1] - b[0])
            if longest[1] == longest[0]:
                raise ValueError(f"max_length {max_length} leaves no room for a word")
            longest[1] -= 1
        for prefix, pieces in (("", teacher_ids), (STUDENT_PREFIX, student_ids)):
            tokenizer, rows = sides[prefix]
            rows.append(_layout(pieces, bounds, tokenizer.cls_token_id, tokenizer.sep_token_id))
    batch = {}
    for prefix, (tokenizer, rows) in sides.items():
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        units = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (row_ids, row_types, row_units) in enumerate(rows):
            ids[r, :len(row_ids)] = torch.tensor(row_ids)
            types[r, :len(row_types)] = torch.tensor(row_types)
            units[r, :len(row_units)] = torch.tensor(row_units)
        batch[prefix + "input_ids"] = ids
        batch[prefix + "attention_mask"] = (units >= 0).long()
        batch[prefix + "token_type_ids"] = types
        batch[prefix + UNIT_IDS] = units
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
    return batch


class DualCollator(Collator):
    """Training batches of DualTrain (``dual_batch``): the teacher's segmentation and the student's mixed one, with
    the rows' labels and cached teacher logits. ``tokenizer`` is the student's: ``encode`` gives the plain
    student-vocabulary inputs that evaluation reads, and it is the tokenizer saved with the student."""

    def __init__(self, student_tokenizer: PreTrainedTokenizerFast, teacher_tokenizer: PreTrainedTokenizerFast,
                 p_teacher: float, max_length: int, seed: int, regression: bool = False):
        super().__init__(student_tokenizer, max_length, regression)
        self.teacher_tokenizer = teacher_tokenizer
        self.p_teacher = p_teacher
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        texts = as_strings(rows[TEXT_A])
        examples = list(zip(texts, as_strings(rows[TEXT_B]))) if TEXT_B in rows else texts
        batch = dual_batch(examples, self.teacher_tokenizer, self.tokenizer, self.p_teacher, self.rng,
                           len(self.tokenizer), self.max_length)
        return self.add_targets(rows, batch)


class SharedProjection(nn.Module):
    """ONE trainable matrix U shared by every layer: x ↦ x U.

    "down": U ∈ R^{d_t×d_s} maps teacher states to the student's width; "up": U ∈ R^{d_s×d_t} maps student states
    to the teacher's. U starts as the truncated identity (semi-orthogonal); ``to_student`` / ``to_teacher`` apply
    U in its direction and Uᵀ against it.
    """

    def __init__(self, teacher_width: int, student_width: int, direction: Direction = "up"):
        super().__init__()
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
        self.direction = direction
        rows, cols = (teacher_width, student_width) if direction == "down" else (student_width, teacher_width)
        self.weight = nn.Parameter(torch.eye(rows, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    def to_student(self, teacher_states: torch.Tensor) -> torch.Tensor:
        return self(teacher_states) if self.direction == "down" else teacher_states @ self.weight.T

    def to_teacher(self, student_states: torch.Tensor) -> torch.Tensor:
        return self(student_states) if self.direction == "up" else student_states @ self.weight.T

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, weight={tuple(self.weight.shape)}"


def mixed_inputs_embeds(
    ids: torch.Tensor, student_embeddings: nn.Embedding, teacher_embeddings: nn.Embedding,
    projection: SharedProjection,
) -> torch.Tensor:
    """Rows of E_mixed = [E_s ; E_t P] for mixed ids [B, L]: ids < V_s read the student's table, the others the
    teacher's row (id − V_s) taken to the student's width by the shared projection."""
    vocab = student_embeddings.num_embeddings
    from_teacher = ids >= vocab
    embeds = student_embeddings(ids.masked_fill(from_teacher, 0))
    if not from_teacher.any():
        return embeds
    teacher_rows = projection.to_student(teacher_embeddings(ids[from_teacher] - vocab))
    return embeds.index_put((from_teacher,), teacher_rows.to(embeds.dtype))


def pool_units(hidden: torch.Tensor, unit_ids: torch.Tensor, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the states [B, L, d] over the positions of each unit: ([B, n_units, d], present [B, n_units]).
    Positions with unit −1 (padding) belong to none."""
    membership = (unit_ids.unsqueeze(-1) == torch.arange(n_units, device=unit_ids.device)).to(hidden.dtype)
    counts = membership.sum(1)
    pooled = membership.transpose(1, 2) @ hidden / counts.clamp_min(1).unsqueeze(-1)
    return pooled, counts > 0


def compression_report(teacher: PreTrainedModel, student: PreTrainedModel) -> dict[str, float]:
    """Parameter counts of both models, embedding tables (word, position, token type) counted apart since the
    vocabulary is what DualTrain shrinks, and the teacher/student ratios."""
    t, s = parameter_counts(teacher), parameter_counts(student)
    report: dict[str, float] = {f"teacher_{k}": v for k, v in t.items()}
    report.update({f"student_{k}": v for k, v in s.items()})
    for key in ("params", "embedding_params", "non_embedding_params"):
        report[f"{key}_ratio"] = t[key] / max(s[key], 1)
    return report
