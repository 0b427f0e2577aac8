"""The seed methods' pipeline wiring without Ray: the ensemble's soft labels in the label path, the vocabulary
stage and a worker that trains with it, DualTrain's collator, the validation of their fields, the cache keys of
single-teacher experiments, and the early-exit, ensemble and parameter sections of the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from kd.batching import LABEL, TEACHER_LOGITS, TEXT_A
from kd.models.dualtrain import STUDENT_INPUT_IDS, UNIT_IDS, DualCollator, train_wordpiece
from kd.ensemble import ensemble_logits
from kd.training import TrainSettings
from kd.methods import get_method
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, validate
from pipeline.preflight import check_students_fit_teacher
from pipeline.report import EARLY_EXIT_FILE, early_exit_curves, write_report
from pipeline.runner import corpus_key, student_corpus
from pipeline.summary import with_timing
from pipeline.summary_schema import Summary
from stages import vocabulary
from stages.label import EnsemblePredictor, TeacherPredictor
from kd.checkpoints import load_tokenizer
from kd.layout import STUDENT_DIR, TOKENIZER_DIR
from kd.worker import LocalIO, build_distiller, train_job

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SENTENCES = ["the movie was good", "a bad plot", "the actor is great", "not very fun", "a dull film",
             "the film was awful", "very good fun", "the plot is not bad"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """Two tiny BERT classifiers of different seeds, each saved with the tiny tokenizer, as teacher artifacts."""
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"teacher{seed}") / STUDENT_DIR
        BertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def rows() -> dict[str, np.ndarray]:
    return {TEXT_A: np.array(SENTENCES), LABEL: np.array([1, 0, 1, 0, 0, 0, 1, 1])}


# ---- the ensemble in the label path ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_labels_average_the_members_probabilities_at_t(model_dirs, temperature):
    members = [TeacherPredictor(str(folder), 2, 16, 1).logits(rows()) for folder in model_dirs]
    labelled = EnsemblePredictor([str(f) for f in model_dirs], [16, 16], 2, temperature, 1)(rows())
    averaged = (torch.softmax(torch.from_numpy(members[0]) / temperature, -1)
                + torch.softmax(torch.from_numpy(members[1]) / temperature, -1)) / 2
    torch.testing.assert_close(torch.softmax(torch.from_numpy(labelled[TEACHER_LOGITS]) / temperature, -1), averaged)
    assert not np.allclose(members[0], members[1])  # two different teachers, so the average is not either one
    assert list(labelled[TEXT_A]) == SENTENCES and labelled[TEACHER_LOGITS].shape == (8, 2)


def test_each_member_reads_its_own_max_length(model_dirs):
    long = {TEXT_A: np.array(["the movie was good " * 4]), LABEL: np.array([1])}
    short = TeacherPredictor(str(model_dirs[1]), 2, 6, 1).logits(dict(long))
    labelled = EnsemblePredictor([str(model_dirs[0]), str(model_dirs[1])], [32, 6], 2, 1.0, 1)(dict(long))
    full = TeacherPredictor(str(model_dirs[0]), 2, 32, 1).logits(dict(long))
    expected = ensemble_logits([torch.from_numpy(full), torch.from_numpy(short)], 1.0).numpy()
    np.testing.assert_allclose(labelled[TEACHER_LOGITS], expected, rtol=1e-5, atol=1e-6)


# ---- the vocabulary stage and the worker that reads it --------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory, model_dirs):
    data = tmp_path_factory.mktemp("data")
    frame = pd.DataFrame({TEXT_A: SENTENCES * 4, LABEL: [1, 0, 1, 0, 0, 0, 1, 1] * 4})
    frame.to_parquet(data / "train.parquet")
    frame.head(8).to_parquet(data / "dev.parquet")
    return data, model_dirs[0].parent


def dualtrain_spec(**params):
    document = {"name": "t", "students": [{"name": "dual", "method": "dualtrain", "student": {"layers": 2, "hidden_size": 8},
                                           "params": {"vocab_size": 40, **params}}]}
    return validate(document).students[0]


def test_vocabulary_stage_trains_on_the_train_split_and_a_worker_trains_with_it(corpus_dirs, tmp_path):
    data, teacher = corpus_dirs
    spec = dualtrain_spec()
    inputs = {"data": Artifact("data", "d", data), "teacher": Artifact("teacher", "t", teacher)}
    config = vocabulary.Config(student=spec, method=spec.method, vocabulary=get_method(spec.method)(spec.params).vocabulary_key())
    facts = vocabulary.run(config, inputs, None, tmp_path)
    built = tmp_path / TOKENIZER_DIR
    assert facts["wordpiece_vocab_size"] == 40 and facts["size"] == len(load_tokenizer(str(built)))
    job = train_job(method="dualtrain", params=spec.params.model_dump(), shape=spec.student.model_dump(),
                    settings=TrainSettings(batch_size=8), teacher=str(teacher / STUDENT_DIR), init_model=None,
                    tokenizer=str(teacher / STUDENT_DIR), max_length=16, num_labels=2, regression=False,
                    train_rows=32, train_path=str(data / "train.parquet"), torch_threads=1, vocabulary=str(built))
    distiller, collator = build_distiller(job, LocalIO(data / "train.parquet", data / "dev.parquet"))
    assert isinstance(collator, DualCollator)
    assert collator.tokenizer.get_vocab() == load_tokenizer(str(built)).get_vocab()  # not retrained
    assert distiller.student.get_input_embeddings().num_embeddings == facts["size"]
    batch = collator({TEXT_A: np.array(SENTENCES[:4]), LABEL: np.array([1, 0, 1, 0]),
                      TEACHER_LOGITS: np.ones((4, 2), dtype=np.float32)})
    assert {STUDENT_INPUT_IDS, UNIT_IDS, "labels", TEACHER_LOGITS} <= set(batch)
    assert math.isfinite(distiller.step(batch)["total"])
    plain = collator.encode({TEXT_A: np.array(SENTENCES[:2])})  # evaluation reads plain student ids
    assert int(plain["input_ids"].max()) < facts["size"]


def test_dual_collator_mixes_segmentations_from_its_seed(tiny_tokenizer):
    student = train_wordpiece(SENTENCES * 3, 40)
    batches = [DualCollator(student, tiny_tokenizer, 0.5, 32, seed)({TEXT_A: np.array(SENTENCES)}) for seed in (0, 0, 1)]
    assert torch.equal(batches[0][STUDENT_INPUT_IDS], batches[1][STUDENT_INPUT_IDS])
    assert not torch.equal(batches[0][STUDENT_INPUT_IDS], batches[2][STUDENT_INPUT_IDS])
    ids = batches[0][STUDENT_INPUT_IDS]
    assert (ids >= len(student)).any() and ((ids < len(student)) & (ids > 4)).any()  # teacher and student pieces


# ---- validation ------------------------------------------------------------------------------------------------

def experiment(*students, **fields) -> dict:
    return {"name": "t", "students": list(students), **fields}


KD = {"name": "kd_2L", "method": "kd", "student": {"layers": 2}}
BILSTM = {"name": "lstm", "method": "bilstm", "student": {"layers": 1}}


def fastbert(**params) -> dict:
    return {"name": "fast", "method": "fastbert", "student": {"layers": 2}, "params": params}


@pytest.mark.parametrize("document, message", [
    (experiment(KD, fastbert(wrap="kd_3L")), "students[1] (fast).params.wrap: 'kd_3L' is neither 'teacher' nor"),
    (experiment(BILSTM, fastbert(wrap="lstm")), "'lstm' is a bilstm student, not a fine-tuned BERT classifier"),
    (experiment({**KD, "student": {"layers": 3}}, fastbert(wrap="kd_2L")),
     "students[1] (fast): fastbert adds branches to a fine-tuned model and keeps its shape: ask for student.layers=3"),
    (experiment({"name": "d", "method": "dualtrain", "student": {"layers": 2}, "params": {"vocab_size": 10}}),
     "students[0].params.vocab_size: Input should be greater than or equal to 32"),
    (experiment({**KD, "soft_labels": "ensemble"}), "students[0] (kd_2L).soft_labels: ensemble needs an `ensemble`"),
    (experiment({"name": "f", "method": "finetune", "student": {"layers": 2}, "soft_labels": "ensemble"},
                ensemble={"teachers": [{}, {"train": {"seed": 1}}]}), "finetune reads no teacher logits"),
    (experiment(KD, ensemble={"teachers": [{}]}), "ensemble.teachers: List should have at least 2 items"),
    (experiment(KD, ensemble={"teachers": [{}, {}]}), "teachers[1] is the same as teachers[0]"),
    (experiment(KD, ensemble={"teachers": [{}, {"source": "x", "mlm": {}}]}), "teachers[1].mlm"),
    (experiment(fastbert(), task={"source": "x.csv", "task_type": "regression"}), "fastbert needs a classification task"),
])
def test_bad_seed_method_fields_get_one_clear_message(document, message):
    with pytest.raises(ConfigError, match="valid experiment") as error:
        validate(document)
    assert message in str(error.value)


@pytest.mark.parametrize("student, message", [
    (fastbert(), "students[0] (fast): fastbert adds branches to a fine-tuned model and keeps its shape: ask for "
                 "student.layers=6"),
    ({"name": "d", "method": "dualtrain", "student": {"layers": 2}, "params": {"vocab_size": 40000}},
     "params.vocab_size: 40000 is not smaller than the teacher's vocabulary (30522)"),
])
def test_students_that_do_not_fit_the_packaged_teacher_are_refused_before_ray(student, message):
    with pytest.raises(ConfigError) as error:
        check_students_fit_teacher(validate(experiment(student)))
    assert message in str(error.value)


def test_a_fastbert_over_the_teacher_and_a_dualtrain_fit_it():
    check_students_fit_teacher(validate(experiment(
        {**fastbert(), "student": {"layers": 6}},
        {"name": "d", "method": "dualtrain", "student": {"layers": 2}, "params": {"vocab_size": 5000}})))


# ---- cache keys and corpora ------------------------------------------------------------------------------------

@pytest.mark.parametrize("student, corpus", [
    (KD, "label"),
    ({**KD, "soft_labels": "ensemble", "params": {"temperature": 4.0}}, "label@ensemble-T4"),
    ({"name": "p", "method": "pkd", "student": {"layers": 2}, "soft_labels": "ensemble"}, "label@ensemble-T10"),
    ({"name": "p", "method": "pkd", "student": {"layers": 2}}, None),
    ({**BILSTM, "soft_labels": "ensemble"}, "label:augmented@ensemble-T1"),
])
def test_students_on_the_ensemble_read_its_soft_labels(student, corpus):
    spec = validate(experiment(student, ensemble={"teachers": [{}, {"train": {"seed": 1}}]})).students[0]
    assert student_corpus(spec) == corpus
    assert corpus_key("label", "task") == "label"


# ---- the report ------------------------------------------------------------------------------------------------

def seed_summary(accuracy_shift: float = 0.0) -> dict:
    parameters = lambda params, embeddings, vocab: {  # noqa: E731
        "params": params, "embedding_params": embeddings, "word_embedding_params": embeddings - 1000,
        "non_embedding_params": params - embeddings, "vocab_size": vocab, "hidden_size": 384}
    base = {"family": "transformer", "baseline": False, "layers": 6, "hidden_size": None, "dev": {"accuracy": 0.8},
            "test": {"accuracy": 0.8 + accuracy_shift}, "params": 20_000_000, "size_bytes": 1, "latency_ms": 60.0,
            "throughput": 1.0, "compression": 1.0,
            "compression_embeddings": 1.0, "compression_non_embedding": 1.0, "speedup": 1.0,
            "parameters": parameters(20_000_000, 12_000_000, 30522), "init": {"from": "teacher", "layers": "uniform"},
            "selected_epoch": 1, "teacher_signals": "cached", "epochs": 1, "epoch_seconds": 1.0, "train_rows": 10,
            "evaluate_dir": "evaluate"}
    sweep = [{"speed": speed, "dev_accuracy": 0.8 - speed / 10, "test_accuracy": 0.8 - speed / 10 + accuracy_shift,
              "avg_exit_layer": 6 - 5 * speed, "latency_ms": 60 - 40 * speed, "speedup": 60 / (60 - 40 * speed)}
             for speed in (0.0, 0.5, 1.0)]
    students = {
        "fast": {**base, "method": "fastbert", "soft_labels": "teacher", "early_exit": sweep},
        "kd_ens": {**base, "method": "kd", "soft_labels": "ensemble", "layers": 3, "params": 2_000_000,
                   "compression": 10.0, "compression_embeddings": 24.0, "compression_non_embedding": 5.0,
                   "parameters": parameters(2_000_000, 500_000, 5000)},
    }
    teacher = {"source": "package:teacher", "fine_tuned": True, "dev": {"accuracy": 0.9}, "test": {"accuracy": 0.9},
               "params": 20_000_000, "size_bytes": 1, "latency_ms": 60.0, "throughput": 1.0,
               "parameters": parameters(20_000_000, 12_000_000, 30522)}
    ensemble = {"teachers": [{"source": "a", "seed": 0, "dev": {"accuracy": 0.9}, "test": {"accuracy": 0.9}},
                             {"source": "a", "seed": 1, "dev": {"accuracy": 0.88}, "test": {"accuracy": 0.89}}],
                "dev": {"accuracy": 0.91}, "test": {"accuracy": 0.92}}
    return {"experiment": "seeds", "metric": "accuracy", "data_dir": "data", "teacher": teacher,
            "students": students, "ensemble": ensemble}


def test_early_exit_curves_average_each_threshold_over_seeds():
    curves = early_exit_curves([Summary.model_validate(seed_summary(shift)) for shift in (0.0, 0.02)])
    assert list(curves) == ["fast"] and [p["speed"] for p in curves["fast"]] == [0.0, 0.5, 1.0]
    assert curves["fast"][1]["test_accuracy"] == pytest.approx(0.76) and curves["fast"][1]["speedup"] == 1.5


def test_report_has_the_sweep_table_and_plot_the_ensemble_and_the_parameters(tmp_path):
    summaries = [Summary.model_validate(seed_summary())]
    labels = np.zeros(10, dtype=int)
    predictions = {name: [np.zeros((10, 2))] for name in summaries[0].students}
    training = {name: {"epoch_seconds": 1.0, "teacher_forwards": 0, "teacher": "none"} for name in predictions}
    paths = write_report(tmp_path, summaries, predictions, labels, training)
    assert paths.early_exit_png == tmp_path / EARLY_EXIT_FILE and paths.early_exit_png.stat().st_size > 1000
    assert paths.early_exit_png in paths.files()
    report = paths.markdown.read_text()
    assert "| 0.5 | 75.0 | 75.0 | 3.50 | 40.0 | 1.50× |" in report  # threshold, dev, test, exit layer, ms, speedup
    assert "| **ensemble of 2** | argmax of the averaged probabilities | 91.0 | 92.0 |" in report
    assert "| kd_ens | kd | 80.0 | 87.0% |" in report  # retention of the ensemble's test accuracy
    assert "| kd_ens | 5,000 | 2.00M | 0.50M | 1.50M | 10.0× | 24.0× | 5.0× |" in report


def test_report_without_seed_methods_has_none_of_their_sections(tmp_path):
    summary = seed_summary()
    del summary["ensemble"], summary["students"]["fast"]["early_exit"]
    summary = Summary.model_validate(summary)
    predictions = {name: [np.zeros((10, 2))] for name in summary.students}
    training = {name: {"epoch_seconds": 1.0, "teacher_forwards": 0, "teacher": "none"} for name in predictions}
    paths = write_report(tmp_path, [summary], predictions, np.zeros(10, dtype=int), training)
    report = paths.markdown.read_text()
    assert paths.early_exit_png is None and not (tmp_path / EARLY_EXIT_FILE).exists()
    assert "Early exit" not in report and "Teacher ensemble" not in report


def test_fresh_timing_replaces_latencies_and_each_early_exit_latency():
    result = {"dev": {"accuracy": 0.9}, "latency_ms": 9.0, "throughput": 1.0,
              "early_exit": [{"speed": 0.0, "latency_ms": 9.0}, {"speed": 0.5, "latency_ms": 7.0}]}
    timing = {"latency_ms": 4.0, "throughput": 8.0, "params": 10, "early_exit_latency_ms": [4.0, 2.0]}
    fresh = with_timing(result, timing)
    assert fresh == {"dev": {"accuracy": 0.9}, "latency_ms": 4.0, "throughput": 8.0,
                     "early_exit": [{"speed": 0.0, "latency_ms": 4.0}, {"speed": 0.5, "latency_ms": 2.0}]}
    assert with_timing(result, None) is result and result["latency_ms"] == 9.0


def stage_keys(document: dict) -> dict[str, str]:
    from pipeline.runner import PipelineRunner

    runner = PipelineRunner(validate(document))
    runner.plan()
    return {name: runner.planned(name).key for name in runner.nodes}


def test_only_an_early_exit_students_evaluation_is_keyed_by_the_exit_speeds():
    document = experiment(KD, fastbert(wrap="kd_2L"))
    before = stage_keys(document)
    after = stage_keys({**document, "evaluate": {"exit_speeds": [0.0, 0.5]}})
    assert {name for name in before if before[name] != after[name]} == {"evaluate fast"}


def test_the_top_k_size_reruns_the_top_k_stage_and_not_the_soft_labels_beside_it():
    textsmooth = {"name": "ts", "method": "textsmooth", "student": {"layers": 2}}
    document = experiment(textsmooth, teacher={"mlm": {"steps": 5}})
    before = stage_keys(document)
    after = stage_keys({**document, "label": {"mlm_top_k": 4}})
    assert {name for name in before if before[name] != after[name]} == {"masked-LM top-k", "distill ts (textsmooth)",
                                                                       "evaluate ts"}
