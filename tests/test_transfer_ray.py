"""Ray smoke runs of the transfer corpora on the smoke profile's cached data, teacher and soft labels: the
masked-LM teacher, Tang augmentation → soft labels → a BiLSTM with its own vocabulary, and TextSmooth's top-k
stage → a TextSmooth student; then TinyBERT's augmentation → soft labels for a DistilBERT student whose
masked-LM term takes the masked-LM teacher's head. Tiny sizes: 2 copies a sentence, 20 MLM steps, k = 4."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from kd.batching import LABEL, NO_LABEL, TEACHER_LOGITS, TEXT_A
from kd.methods import get_method
from kd.students import StudentShape
from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS
from pipeline.artifacts import Artifact
from pipeline.config import load_experiment
from pipeline.runner import PipelineRunner
from stages.distill import student_job
from kd.layout import MLM_DIR
from kd.checkpoints import load_classifier, load_tokenizer
from kd.layout import STUDENT_DIR

from conftest import SMOKE_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

TRAIN = "train: {epochs: 1, batch_size: 32, learning_rate: 2.0e-3, report_every: 5}"
MLM_TEACHER = "teacher.mlm={steps: 20, batch_size: 16, learning_rate: 1.0e-3, train: head}"
TRANSFER = [
    MLM_TEACHER,
    "augment={rule: tang, copies: 2}",
    "label.mlm_top_k=4",
    "students=[{name: bilstm_aug, method: bilstm, data: augmented, student: {layers: 1, hidden_size: 32}, "
    f"params: {{vocabulary: corpus, embeddings: random, embedding_dim: 32, mlp_hidden: 32}}, {TRAIN}}}, "
    "{name: textsmooth_2L, method: textsmooth, student: {layers: 2}, "
    "train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-4, report_every: 2}}]",
]


# TinyBERT's rule, on the masked-LM teacher above (cached when both tests run), for a DistilBERT student whose
# MLM term is on by default (alpha_mlm 2) with no head of its own.
TINYBERT = [
    MLM_TEACHER,
    "augment={rule: tinybert, copies: 2, mlm_p: 0.4, mlm_k: 8}",
    "students=[{name: distilbert_aug, method: distilbert, data: augmented, student: {layers: 2}, "
    "train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-4, report_every: 5}}]",
]


def artifacts(workdir, stage: str) -> list[Artifact]:
    return [Artifact(stage, p.name, p) for p in (workdir / "artifacts" / stage).iterdir() if not p.name.startswith(".")]


def only_artifact(workdir, stage: str) -> Artifact:
    (artifact,) = artifacts(workdir, stage)
    return artifact


def test_augment_label_bilstm_and_textsmooth_topk_through_ray(smoke_pipeline):
    exp, _, _ = smoke_pipeline
    transfer = load_experiment(SMOKE_CONFIG, TRANSFER, workdir=exp.workdir)
    runner = PipelineRunner(transfer, Console(width=160))
    summary = runner.run()
    # Cached from the smoke run: data, teacher, the train split's soft labels, the teacher's evaluation. New:
    # masked-LM teacher, augment, soft labels of the augmented corpus, top-k, and two distil + evaluate.
    assert runner.counts == {"cached": 4, "ran": 8}

    mlm = only_artifact(exp.workdir, "mlm_teacher").result()
    assert mlm["masked_accuracy"]["after"] > mlm["masked_accuracy"]["before"] and mlm["masked_tokens"] > 100

    (augment,) = [a for a in artifacts(exp.workdir, "augment") if a.result()["rule"] == "tang"]
    facts = augment.result()
    corpus = pd.read_parquet(augment.path / "data")
    assert facts["rule"] == "tang" and facts["sentences"] == 200 and 200 < facts["copies"] <= 400
    assert len(corpus) == facts["rows"] and (corpus[LABEL] == NO_LABEL).sum() == facts["copies"]
    (labelled,) = [p for p in (exp.workdir / "artifacts" / "label").iterdir()
                   if Artifact("label", p.name, p).result().get("rows") == facts["rows"]]
    assert TEACHER_LOGITS in pq.read_schema(next((labelled / "data").glob("*.parquet"))).names

    topk = only_artifact(exp.workdir, "mlm_topk")
    assert {k: v for k, v in topk.result().items() if k not in ("seconds", "started_at", "finished_at")} == {
        "rows": 200, "k": 4}
    schema = pq.read_schema(next((topk.path / "data").glob("*.parquet")))
    assert schema.field(MLM_TOPK_IDS).type.value_type.value_type == pa.int32()
    assert schema.field(MLM_TOPK_PROBS).type.value_type.value_type == pa.float16()

    students = summary["students"]
    assert set(students) == {"bilstm_aug", "textsmooth_2L"}
    assert students["bilstm_aug"]["train_rows"] == facts["rows"] and students["textsmooth_2L"]["train_rows"] == 200
    assert all(0 <= s["dev"]["accuracy"] <= 1 and s["latency_ms"] > 0 for s in students.values())
    # The BiLSTM (the smoke profile has none) is saved with the word-level vocabulary it trained with.
    (bilstm,) = [p / STUDENT_DIR for p in (exp.workdir / "artifacts" / "distill").iterdir()
                 if (p / STUDENT_DIR / "config.json").exists() and '"kd-bilstm"' in (p / STUDENT_DIR / "config.json").read_text()]
    tokenizer = load_tokenizer(str(bilstm))
    assert len(tokenizer) < 5000 and load_classifier(str(bilstm), 2).config.vocab_size == len(tokenizer)


def test_tinybert_augmentation_through_ray_and_the_masked_lm_head_distilbert_takes(smoke_pipeline):
    """The shared stages only (no student is trained: a TorchTrainer would cost half a minute more); the
    student's job is built as the distill stage builds it, and its masked-LM head loaded from it."""
    exp, _, _ = smoke_pipeline
    runner = PipelineRunner(load_experiment(SMOKE_CONFIG, TINYBERT, workdir=exp.workdir), Console(width=160))
    (spec,) = runner.exp.students
    with runner.start().pipeline_run(runner.exp.name, {}):
        prepared = runner.prepare([spec])

    facts = prepared["augment"].result()
    corpus = pd.read_parquet(prepared["augment"].path / "data")
    assert facts["rule"] == "tinybert" and facts["sentences"] == 200 and 200 < facts["copies"] <= 400
    assert len(corpus) == facts["rows"] == prepared["label:augmented"].result()["rows"]
    # Each original row is followed by its copies: distinct, and all of one word count (the rule replaces words
    # one for one; the original keeps its own spacing, so it may count differently).
    sentence = (corpus[LABEL] != NO_LABEL).cumsum()
    assert sentence.iloc[-1] == 200 and corpus.groupby(sentence)[TEXT_A].agg(lambda texts: texts.is_unique).all()
    copies = corpus[LABEL] == NO_LABEL
    assert (corpus[TEXT_A][copies].str.split().str.len().groupby(sentence[copies]).nunique() == 1).all()

    job, _ = student_job(runner.exp, spec, runner.student_inputs(prepared, spec))
    assert job["params"]["mlm_head"] == str(prepared["mlm_teacher"].path / MLM_DIR)
    assert job["train_rows"] == facts["rows"]
    method = get_method("distilbert")(job["params"])
    teacher = load_classifier(job["teacher"], 2)
    student = method.build_student(teacher, StudentShape.model_validate(job["shape"]))
    head = method.auxiliary_modules(student, teacher)["mlm"]
    assert head.vocab_size == student.config.vocab_size and head.mask_token_id == load_tokenizer(job["teacher"]).mask_token_id
