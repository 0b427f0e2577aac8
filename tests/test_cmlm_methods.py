"""The generation methods ``nll`` and ``cmlm``: their losses, the collator's alignment of the C-MLM top-k with the
student's labels, and a tiny end-to-end run through ``kd.worker.train_student``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BertForMaskedLM

from conftest import WORDS, tiny_bert_config
from kd.cmlm import (
    CMLM_TOPK_IDS,
    CMLM_TOPK_PROBS,
    SOURCE,
    TARGET,
    TOPK_IDS,
    TOPK_PROBS,
    cmlm_loss,
    encode_pairs,
    soft_targets,
)
from kd.layout import HISTORY_FILE, STUDENT_DIR
from kd.methods import METHODS, get_method
from kd.methods.cmlm import seq2seq_shape
from kd.mlm import IGNORE_INDEX
from kd.students import StudentShape
from kd.training import Distiller, TrainSettings
from kd.worker import LocalIO, kept_student, selected_epoch, train_job, train_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, TEMPERATURE, MAX_SOURCE, MAX_TARGET = 4, 2.0, 8, 6


def pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Synthetic pairs over the tiny vocabulary: the target copies the source's first words, so it is learnable."""
    rng = np.random.default_rng(seed)
    sources = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]
    targets = [" ".join(source.split()[: rng.integers(1, 4)]) for source in sources]
    return sources, targets


def readings(teacher, tokenizer, sources, targets) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each pair's top-k ids and probabilities [target tokens, k], as ``stages/cmlm_topk.py`` computes them."""
    batch = encode_pairs(tokenizer, sources, targets, MAX_SOURCE, MAX_TARGET)
    read = soft_targets(teacher, batch, rounds=3, k=K, temperature=TEMPERATURE, mask_token_id=tokenizer.mask_token_id)
    bounds = np.cumsum(batch["target_mask"].sum(1).tolist())[:-1]
    return np.split(read["topk_ids"].numpy(), bounds), np.split(read["topk_probs"].numpy(), bounds)


def rows_of(sources, targets, ids=None, probs=None) -> dict[str, np.ndarray]:
    """A batch of rows as Parquet hands them to a collator: object columns of per-row arrays of k-vectors."""
    rows = {SOURCE: np.array(sources, dtype=object), TARGET: np.array(targets, dtype=object)}
    if ids is not None:
        def cells(arrays):
            column = np.empty(len(arrays), dtype=object)
            # Each cell a 1-D object array of k-vectors (the trailing None keeps numpy from stacking them).
            column[:] = [np.array([np.asarray(vector) for vector in array] + [None], dtype=object)[:-1]
                         for array in arrays]
            return column
        rows[CMLM_TOPK_IDS], rows[CMLM_TOPK_PROBS] = cells(ids), cells(probs)
    return rows


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config()).eval()


def method_and_student(name: str, teacher, tokenizer, **params):
    method = get_method(name)({"max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET, **params})
    method.student_tokenizer(tokenizer, [])
    torch.manual_seed(1)
    return method, method.build_student(teacher, StudentShape(layers=2)).eval()  # no dropout: comparable calls


def test_the_methods_are_seq2seq_and_nll_is_the_baseline():
    for name in ("nll", "cmlm"):
        method = METHODS[name]()
        assert method.task_types == {"seq2seq"} and method.family == "seq2seq"
        assert not method.copies_layers and not method.bert_student
        assert method.selection_metric(regression=False) == "token_accuracy"
    assert METHODS["nll"]().is_baseline() and not METHODS["cmlm"]().is_baseline()
    assert METHODS["cmlm"].cached_signals == {"cmlm_topk"} and not METHODS["nll"].cached_signals
    assert METHODS["cmlm"]().teacher_signals() == "cached" and METHODS["nll"]().teacher_signals() == "none"
    assert METHODS["finetune"]().task_types == {"classification", "regression"}
    assert METHODS["finetune"]().selection_metric(regression=True) == "pearson"


def test_the_student_block_maps_onto_the_bart_shape():
    config = tiny_bert_config()  # hidden 16, 2 heads, ffn 32
    same = seq2seq_shape(StudentShape(layers=2), config)
    assert (same.encoder_layers, same.decoder_layers, same.d_model, same.heads, same.ffn_dim, same.init) == (
        2, 2, 16, 2, 32, "teacher")
    narrow = seq2seq_shape(StudentShape(layers=3, hidden_size=8, init="random"), config, decoder_layers=1)
    assert (narrow.encoder_layers, narrow.decoder_layers, narrow.d_model, narrow.heads, narrow.ffn_dim,
            narrow.init) == (3, 1, 8, 1, 32, "random")
    method = METHODS["cmlm"]()
    method.check_teacher(StudentShape(layers=2, init="random", hidden_size=8), config)
    with pytest.raises(ValueError, match="hidden_size 8 ≠ teacher's 16"):
        method.check_teacher(StudentShape(layers=2, hidden_size=8), config)


def test_cmlm_loss_is_kd_cmlm_loss_and_nll_is_the_plain_nll(teacher, tiny_tokenizer):
    sources, targets = ["the movie is good", "a film was not fun"], ["a great film", "dull"]
    ids, probs = readings(teacher, tiny_tokenizer, sources, targets)
    method, student = method_and_student("cmlm", teacher, tiny_tokenizer, alpha=0.3, temperature=TEMPERATURE, k=K)
    batch = method.collator(tiny_tokenizer, tiny_tokenizer, 128, False, 0)(rows_of(sources, targets, ids, probs))
    out = method.student_forward(student, batch, torch.nn.ModuleDict(), "train")
    # BART's own teacher forcing, given the labels, reads the same logits.
    reference = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(out.logits, reference.logits)
    expected = cmlm_loss(reference.logits, batch["labels"], batch[TOPK_IDS], batch[TOPK_PROBS], 0.3, TEMPERATURE)
    loss = method.loss(out, None, batch, torch.nn.ModuleDict(), "train")
    assert set(loss) == {"kd", "nll", "total"}
    for key in loss:
        torch.testing.assert_close(loss[key], expected[key])
    assert loss["kd"] > 0

    nll_method, nll_student = method_and_student("nll", teacher, tiny_tokenizer)
    plain = nll_method.collator(tiny_tokenizer, tiny_tokenizer, 128, False, 0)(rows_of(sources, targets, ids, probs))
    assert TOPK_IDS not in plain  # the baseline reads no readings, even where the rows have them
    out = nll_method.student_forward(nll_student, plain, torch.nn.ModuleDict(), "train")
    loss = nll_method.loss(out, None, plain, torch.nn.ModuleDict(), "train")
    labels = plain["labels"]
    expected_nll = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert set(loss) == {"nll", "total"}
    torch.testing.assert_close(loss["total"], expected_nll)
    torch.testing.assert_close(loss["nll"], nll_student(**{k: plain[k] for k in ("input_ids", "attention_mask")},
                                                        labels=labels).loss)


def test_the_collator_aligns_readings_with_label_positions(teacher, tiny_tokenizer):
    sources, targets = ["the movie is good", "a", "not fun"], ["a great film", "the actor is bad", ""]
    ids, probs = readings(teacher, tiny_tokenizer, sources, targets)
    assert [len(row) for row in ids] == [3, 4, 0]
    method = get_method("cmlm")({"max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET, "k": K})
    collator = method.collator(tiny_tokenizer, tiny_tokenizer, 128, False, 0)
    batch = collator(rows_of(sources, targets, ids, probs))
    labels = batch["labels"]
    assert batch[TOPK_IDS].shape == batch[TOPK_PROBS].shape == (3, labels.shape[1], K)
    sep = tiny_tokenizer.sep_token_id
    for row, count in enumerate([3, 4, 0]):
        # Label position i is target token i, whose reading is the row's i-th; then [SEP], which has none.
        assert labels[row, count] == sep and (labels[row, count + 1:] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(batch[TOPK_IDS][row, :count].numpy(), ids[row])
        np.testing.assert_array_equal(batch[TOPK_PROBS][row, :count].numpy(), probs[row])
        assert (batch[TOPK_PROBS][row, count:] == 0).all()
    assert batch[TOPK_PROBS].sum(-1)[0, :3].float().allclose(torch.ones(3), atol=1e-2)

    # Evaluation encodes the pair alone.
    assert set(collator.encode(rows_of(sources, targets))) == {"input_ids", "attention_mask", "labels"}

    # Readings cut at another max_target_length land on other tokens: refused.
    short = get_method("cmlm")({"max_source_length": MAX_SOURCE, "max_target_length": 2, "k": K})
    with pytest.raises(ValueError, match="row 0: the C-MLM top-k covers 3 target tokens, but the student's labels"):
        short.collator(tiny_tokenizer, tiny_tokenizer, 128, False, 0)(rows_of(sources, targets, ids, probs))
    # A smaller k keeps the first (most likely) ids; a larger one than stored is refused.
    two = get_method("cmlm")({"max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET, "k": 2})
    kept = two.collator(tiny_tokenizer, tiny_tokenizer, 128, False, 0)(rows_of(sources, targets, ids, probs))
    np.testing.assert_array_equal(kept[TOPK_IDS][0, :3].numpy(), ids[0][:, :2])
    wide = get_method("cmlm")({"max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET, "k": K + 1})
    with pytest.raises(ValueError, match=f"stores {K} ids per token; the student asks for k = {K + 1}"):
        wide.collator(tiny_tokenizer, tiny_tokenizer, 128, False, 0)(rows_of(sources, targets, ids, probs))


def write_pairs(path, sources, targets, ids=None, probs=None) -> None:
    columns = {SOURCE: pa.array(sources), TARGET: pa.array(targets)}
    if ids is not None:
        columns[CMLM_TOPK_IDS] = pa.array([row.tolist() for row in ids], pa.list_(pa.list_(pa.int32())))
        columns[CMLM_TOPK_PROBS] = pa.array([[list(vector) for vector in row] for row in probs],
                                            pa.list_(pa.list_(pa.float16())))
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize("name", ["cmlm", "nll"])
def test_train_student_distils_a_seq2seq_student(name, teacher, tiny_tokenizer, tmp_path):
    teacher_dir = tmp_path / "cmlm_teacher"
    teacher.save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    sources, targets = pairs(40, seed=0)
    dev_sources, dev_targets = pairs(12, seed=1)
    train_path, dev_path = tmp_path / "train.parquet", tmp_path / "dev.parquet"
    if name == "cmlm":
        write_pairs(train_path, sources, targets, *readings(teacher, tiny_tokenizer, sources, targets))
        params = {"k": K, "temperature": TEMPERATURE, "alpha": 0.5}
    else:
        write_pairs(train_path, sources, targets)
        params = {}
    write_pairs(dev_path, dev_sources, dev_targets)
    job = train_job(method=name, params={"max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET, **params},
                    shape={"layers": 2}, settings=TrainSettings(epochs=2, batch_size=8, learning_rate=1e-3),
                    teacher=str(teacher_dir), init_model=None, tokenizer=str(teacher_dir), max_length=32,
                    num_labels=0, regression=False, train_rows=40, train_path=str(train_path), torch_threads=1)
    reports, checkpoints = [], []

    def report(metrics, directory):
        reports.append(metrics)
        checkpoints.append(shutil.copytree(directory, tmp_path / f"checkpoint{len(checkpoints)}"))

    distiller = train_student(job, LocalIO(train_path, dev_path, report=report), verbose=False)
    assert type(distiller.student).__name__ == "BartForConditionalGeneration"
    assert distiller.student.config.encoder_layers == distiller.student.config.decoder_layers == 2
    assert distiller.student.config.vocab_size == teacher.config.vocab_size  # the teacher's vocabulary

    assert len(reports) == 2
    losses = {"kd", "nll", "total"} if name == "cmlm" else {"nll", "total"}
    assert all(np.isfinite(report[f"loss/{key}"]) for report in reports for key in losses)
    assert all(0 <= report["dev_token_accuracy"] <= 1 and report["dev_nll"] > 0 for report in reports)
    history = [record for record in distiller.progress.history if "dev" in record]
    assert [record["epoch"] for record in history] == [1, 2]
    assert all(set(record["dev"]) == {"token_accuracy", "nll"} for record in history)
    assert selected_epoch(distiller.progress.history) in (1, 2)
    assert selected_epoch(json.loads((checkpoints[-1] / HISTORY_FILE).read_text())) in (1, 2)

    # The last student as saved is the one in memory, its tied embeddings included.
    last = AutoModelForSeq2SeqLM.from_pretrained(checkpoints[-1] / STUDENT_DIR).eval()
    batch = distiller.method.collator(tiny_tokenizer, tiny_tokenizer, 32, False, 0).encode(
        {SOURCE: dev_sources[:4], TARGET: dev_targets[:4]})
    student = distiller.student.eval()
    torch.testing.assert_close(last(**batch).logits, student(**batch).logits)

    kept = kept_student(checkpoints[-1])
    student = AutoModelForSeq2SeqLM.from_pretrained(kept)
    tokenizer = AutoTokenizer.from_pretrained(kept)
    source = tokenizer([dev_sources[0]], return_tensors="pt", return_token_type_ids=False)
    generated = student.generate(**source, max_new_tokens=5, num_beams=1, do_sample=False)
    assert generated.shape[0] == 1 and generated[0, 0] == tokenizer.cls_token_id  # decoding starts at [CLS]
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


def test_the_trainer_state_round_trips_with_tied_embeddings(teacher, tiny_tokenizer, tmp_path):
    """BART ties its word embeddings under four names, which plain safetensors refuses: the trainer's state is
    written with each shared tensor once, and loading it back keeps them tied."""
    method, student = method_and_student("nll", teacher, tiny_tokenizer)
    distiller = Distiller(method, student, None, TrainSettings(), steps_per_epoch=1)
    distiller.save_state(tmp_path)
    _, other = method_and_student("nll", teacher, tiny_tokenizer)
    with torch.no_grad():
        other.model.shared.weight.zero_()
    restored = Distiller(method, other, None, TrainSettings(), steps_per_epoch=1)
    restored.load_state(tmp_path)
    torch.testing.assert_close(other.lm_head.weight, student.model.shared.weight)
    assert other.lm_head.weight.data_ptr() == other.model.shared.weight.data_ptr()


def test_a_generation_method_on_a_classification_task_is_refused():
    from pipeline.config import ConfigError, validate

    document = {"name": "t", "students": [{"name": "s", "method": "cmlm", "student": {"layers": 2}}]}
    with pytest.raises(ConfigError, match=r"students\[0\] \(s\): cmlm trains students for seq2seq tasks, not "
                                          "classification"):
        validate(document)
