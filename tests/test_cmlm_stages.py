"""The two teacher-side stages of C-MLM distillation for text generation: the C-MLM teacher's fine-tuning (its
inner function, without Ray), the top-k actor (called as Ray Data would call it), and both stages' ``run`` through
the shared local Ray, whose Parquet must line up with ``kd.cmlm.student_batch`` and equal ``soft_targets``
computed here. Tiny random BERTs over conftest's 16-word vocabulary."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from transformers import BertForMaskedLM

from kd.checkpoints import load_tokenizer
from kd.cmlm import encode_pairs, masked_target_accuracy, soft_targets, student_batch
from kd.errors import StageError
from kd.layout import MLM_DIR
from kd.mlm import masked_lm_from
from stages import cmlm_teacher, cmlm_topk
from stages.cmlm_teacher import CmlmSettings, check_pair_length, train_cmlm_teacher
from stages.cmlm_topk import CMLM_TOPK_IDS, CMLM_TOPK_PROBS, CmlmTopKPredictor
from stages.config import LabelConfig, RayConfig, TeacherConfig

from conftest import reversed_pairs, tiny_bert_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCE_LENGTH, TARGET_LENGTH = 8, 6
K, ROUNDS, TEMPERATURE = 4, 2, 1.5


@pytest.fixture
def data_dir(tmp_path):
    """A seq2seq task's splits as the data stage writes them (string columns source and target)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, count, seed in (("train", 40, 0), ("dev", 16, 1), ("test", 16, 2)):
        frame = reversed_pairs(count, seed)
        if split == "train":
            frame["pair_id"] = np.arange(count)  # an extra column the top-k stage must carry along
        frame.to_parquet(folder / f"{split}.parquet", index=False)
    return folder


def save_masked_lm(folder, tokenizer, **config) -> str:
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config(**config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def masked_lm_dir(tmp_path, tiny_tokenizer) -> str:
    """The checkpoint the C-MLM teacher starts from: a tiny random masked LM and its tokenizer."""
    return save_masked_lm(tmp_path / "checkpoint", tiny_tokenizer)


@pytest.fixture
def peaked_teacher_dir(tmp_path, tiny_tokenizer) -> str:
    """A C-MLM teacher as the stage saves one. Weights wider than BERT's 0.02 give peaked distributions, so the
    top-k ids are not left to near-ties (and float noise between two runs cannot reorder them)."""
    return save_masked_lm(tmp_path / "teacher", tiny_tokenizer, num_hidden_layers=2, initializer_range=0.5)


def expected_readings(model_dir: str, frame: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """``soft_targets`` in-process, all pairs in one batch, split into rows."""
    tokenizer = load_tokenizer(model_dir)
    batch = encode_pairs(tokenizer, list(frame.source), list(frame.target), SOURCE_LENGTH, TARGET_LENGTH)
    read = soft_targets(masked_lm_from(model_dir), batch, ROUNDS, K, TEMPERATURE, mask_token_id=tokenizer.mask_token_id)
    bounds = np.cumsum(batch["target_mask"].sum(1).tolist())[:-1]
    return list(zip(np.split(read["topk_ids"].numpy(), bounds), np.split(read["topk_probs"].numpy(), bounds)))


def student_label_counts(tokenizer, frame: pd.DataFrame) -> list[int]:
    labels = student_batch(tokenizer, list(frame.source), list(frame.target), SOURCE_LENGTH, TARGET_LENGTH)["labels"]
    return (labels != -100).sum(1).tolist()


def check_rows(out: list[dict], frame: pd.DataFrame, model_dir: str) -> None:
    """Each written row against its pair: one k-vector per student label but the final [SEP], probabilities
    summing to 1, and the same readings as ``soft_targets`` in-process."""
    expected = expected_readings(model_dir, frame)
    labels = student_label_counts(load_tokenizer(model_dir), frame)
    for row in out:
        index = int(row["pair_id"])
        assert (row["source"], row["target"]) == (frame.source[index], frame.target[index])
        ids = np.array(row[CMLM_TOPK_IDS], dtype=np.int64).reshape(-1, K)
        probs = np.array(row[CMLM_TOPK_PROBS], dtype=np.float32).reshape(-1, K)
        assert len(ids) == len(probs) == labels[index] - 1
        assert np.allclose(probs.sum(1), 1.0, atol=2e-3)
        assert (np.diff(probs, axis=1) <= 0).all()
        assert np.array_equal(ids, expected[index][0])
        assert np.allclose(probs, expected[index][1].astype(np.float32), atol=1e-3)


# --- the C-MLM teacher, without Ray ---------------------------------------------------------------------------


def test_teacher_fine_tuning_lowers_the_loss_and_saves_a_masked_lm(masked_lm_dir, data_dir, tmp_path, capsys):
    settings = CmlmSettings(steps=30, batch_size=16, learning_rate=5e-3, max_source_length=SOURCE_LENGTH,
                            max_target_length=TARGET_LENGTH)
    out = tmp_path / "out" / MLM_DIR
    result = train_cmlm_teacher(masked_lm_dir, str(data_dir), str(out), settings.model_dump(), seed=0, threads=1,
                                report_every=10)

    assert set(result["masked_accuracy"]) == {"before", "after"}
    assert all(0.0 <= value <= 1.0 for value in result["masked_accuracy"].values())
    assert result["steps"] == 30 and result["train_pairs"] == 40 and result["masked_tokens"] >= 16
    assert [record["step"] for record in result["history"]] == [10, 20, 30]
    losses = [record["loss/cmlm"] for record in result["history"]]
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
    assert "[cmlm_teacher] step 30/30" in capsys.readouterr().out

    model, tokenizer = masked_lm_from(str(out)), load_tokenizer(str(out))
    dev = pd.read_parquet(data_dir / "dev.parquet")
    again = masked_target_accuracy(model, tokenizer, list(dev.source), list(dev.target), SOURCE_LENGTH,
                                   TARGET_LENGTH, seed=0)
    assert again["accuracy"] == pytest.approx(result["masked_accuracy"]["after"])


def test_teacher_fine_tuning_is_reproducible(masked_lm_dir, data_dir, tmp_path):
    settings = CmlmSettings(steps=4, batch_size=8, max_source_length=SOURCE_LENGTH,
                            max_target_length=TARGET_LENGTH).model_dump()
    runs = [train_cmlm_teacher(masked_lm_dir, str(data_dir), str(tmp_path / name), settings, seed=3, threads=1,
                               report_every=2)["history"] for name in ("a", "b")]
    assert runs[0] == runs[1]


def test_settings_and_lengths_are_checked(masked_lm_dir):
    assert CmlmSettings().model_dump() == {"steps": 1000, "batch_size": 32, "learning_rate": 5e-5,
                                           "max_source_length": 64, "max_target_length": 64,
                                           "mask_probability": 0.15, "warmup_ratio": 0.1}
    with pytest.raises(ValidationError):
        CmlmSettings(epochs=1)
    check_pair_length(masked_lm_dir, 30, 31)  # 64 positions: 30 + 31 + 3 fit
    with pytest.raises(StageError, match="65 positions, but .* has 64"):
        check_pair_length(masked_lm_dir, 30, 32)
    # Ray's resources and the inference batch are no part of the top-k stage's key; k, rounds and T are.
    base = cmlm_topk.Config(label=LabelConfig(), k=K, rounds=ROUNDS, temperature=TEMPERATURE)
    faster = cmlm_topk.Config(label=LabelConfig(actors=4, batch_size=8), k=K, rounds=ROUNDS, temperature=TEMPERATURE)
    assert base.key_values() == faster.key_values()
    assert base.key_values() != cmlm_topk.Config(label=LabelConfig(), k=K, rounds=ROUNDS + 1).key_values()


# --- the top-k actor, without Ray -------------------------------------------------------------------------------


def test_topk_actor_aligns_with_the_student_labels(peaked_teacher_dir, tiny_tokenizer):
    frame = pd.concat([reversed_pairs(12, 5), pd.DataFrame({"source": ["a film"], "target": [""]})], ignore_index=True)
    frame["pair_id"] = np.arange(len(frame))
    predictor = CmlmTopKPredictor(peaked_teacher_dir, SOURCE_LENGTH, TARGET_LENGTH, K, ROUNDS, TEMPERATURE, threads=1)
    out = predictor(pa.Table.from_pandas(frame, preserve_index=False))
    assert out.column_names == ["source", "target", "pair_id", CMLM_TOPK_IDS, CMLM_TOPK_PROBS]
    assert out.schema.field(CMLM_TOPK_IDS).type == pa.list_(pa.list_(pa.int32()))
    assert out.schema.field(CMLM_TOPK_PROBS).type == pa.list_(pa.list_(pa.float16()))
    rows = out.to_pylist()
    assert rows[-1][CMLM_TOPK_IDS] == []  # an empty target: no reading; its student learns [SEP] from the NLL alone
    check_rows(rows, frame, peaked_teacher_dir)

    empty = predictor(pa.Table.from_pandas(frame.iloc[:0], preserve_index=False))
    assert empty.num_rows == 0 and empty.schema.field(CMLM_TOPK_PROBS).type == pa.list_(pa.list_(pa.float16()))


# --- both stages through Ray --------------------------------------------------------------------------------------


@pytest.mark.ray
def test_teacher_then_topk_through_ray(ray_session, peaked_teacher_dir, data_dir, tmp_path):
    settings = CmlmSettings(steps=3, batch_size=8, learning_rate=1e-4, max_source_length=SOURCE_LENGTH,
                            max_target_length=TARGET_LENGTH)
    ray_config = RayConfig(address="local", cpus_per_worker=1, torch_threads=1)
    teacher_cfg = cmlm_teacher.Config(teacher=TeacherConfig(source=peaked_teacher_dir), seed=0, ray=ray_config,
                                      cmlm=settings)
    teacher_out = tmp_path / "cmlm_teacher"
    data = SimpleNamespace(path=data_dir)
    trained = cmlm_teacher.run(teacher_cfg, {"data": data}, None, teacher_out)
    assert trained["steps"] == 3 and set(trained["masked_accuracy"]) == {"before", "after"}
    assert (teacher_out / MLM_DIR / "config.json").exists()

    topk_cfg = cmlm_topk.Config(label=LabelConfig(batch_size=16, actors=1, threads_per_actor=1), k=K, rounds=ROUNDS,
                                temperature=TEMPERATURE, max_source_length=SOURCE_LENGTH,
                                max_target_length=TARGET_LENGTH)
    topk_out = tmp_path / "cmlm_topk"
    result = cmlm_topk.run(topk_cfg, {"data": data, "cmlm_teacher": SimpleNamespace(path=teacher_out)}, None,
                           topk_out)
    print(f"\ncmlm_topk: {result['rows']} rows in {result['seconds']}s, {result['rows_per_second']} rows/s")
    assert {key: result[key] for key in ("rows", "k", "rounds", "temperature")} == {
        "rows": 40, "k": K, "rounds": ROUNDS, "temperature": TEMPERATURE}
    assert result["rows_per_second"] > 0

    table = pq.read_table(topk_out / "data")
    assert table.schema.field(CMLM_TOPK_IDS).type == pa.list_(pa.list_(pa.int32()))
    assert table.schema.field(CMLM_TOPK_PROBS).type == pa.list_(pa.list_(pa.float16()))
    rows = table.to_pylist()
    assert sorted(int(row["pair_id"]) for row in rows) == list(range(40))  # one row per pair
    frame = pd.read_parquet(data_dir / "train.parquet")
    assert any(len(target.split()) > TARGET_LENGTH for target in frame.target)  # some targets were cut
    check_rows(rows, frame, str(teacher_out / MLM_DIR))
