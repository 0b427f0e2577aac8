"""One Ray smoke run of the transfer corpora on the smoke profile's cached data, teacher and soft labels: the
masked-LM teacher, Tang augmentation → soft labels → a BiLSTM with its own vocabulary, and TextSmooth's top-k
stage → a TextSmooth student. Tiny sizes: 2 copies a sentence, 20 MLM steps, k = 4."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from kd.batching import LABEL, NO_LABEL, TEACHER_LOGITS
from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS
from pipeline.artifacts import Artifact
from pipeline.config import load_experiment
from pipeline.runner import PipelineRunner
from stages.models import load_classifier, load_tokenizer
from stages.student_training import STUDENT_DIR

from conftest import SMOKE_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

TRAIN = "train: {epochs: 1, batch_size: 32, learning_rate: 2.0e-3, report_every: 5}"
TRANSFER = [
    "teacher.mlm={steps: 20, batch_size: 16, learning_rate: 1.0e-3, train: head}",
    "augment={rule: tang, copies: 2}",
    "label.mlm_top_k=4",
    "students=[{name: bilstm_aug, method: bilstm, data: augmented, student: {layers: 1, hidden_size: 32}, "
    f"params: {{vocabulary: corpus, embeddings: random, embedding_dim: 32, mlp_hidden: 32}}, {TRAIN}}}, "
    "{name: textsmooth_2L, method: textsmooth, student: {layers: 2}, "
    "train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-4, report_every: 2}}]",
]


def only_artifact(workdir, stage: str) -> Artifact:
    (path,) = [p for p in (workdir / "artifacts" / stage).iterdir() if not p.name.startswith(".")]
    return Artifact(stage, path.name, path)


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

    augment = only_artifact(exp.workdir, "augment")
    facts = augment.result()
    corpus = pd.read_parquet(augment.path / "data")
    assert facts["rule"] == "tang" and facts["sentences"] == 200 and 200 < facts["copies"] <= 400
    assert len(corpus) == facts["rows"] and (corpus[LABEL] == NO_LABEL).sum() == facts["copies"]
    (labelled,) = [p for p in (exp.workdir / "artifacts" / "label").iterdir()
                   if Artifact("label", p.name, p).result().get("rows") == facts["rows"]]
    assert TEACHER_LOGITS in pq.read_schema(next((labelled / "data").glob("*.parquet"))).names

    topk = only_artifact(exp.workdir, "mlm_topk")
    assert topk.result() == {"rows": 200, "k": 4, "seconds": topk.result()["seconds"]}
    schema = pq.read_schema(next((topk.path / "data").glob("*.parquet")))
    assert schema.field(MLM_TOPK_IDS).type.value_type.value_type == pa.int32()
    assert schema.field(MLM_TOPK_PROBS).type.value_type.value_type == pa.float16()

    students = summary["students"]
    assert set(students) == {"bilstm_aug", "textsmooth_2L"}
    assert all(0 <= s["dev"]["accuracy"] <= 1 and s["latency_ms"] > 0 for s in students.values())
    # The BiLSTM (the smoke profile has none) is saved with the word-level vocabulary it trained with.
    (bilstm,) = [p / STUDENT_DIR for p in (exp.workdir / "artifacts" / "distill").iterdir()
                 if (p / STUDENT_DIR / "config.json").exists() and '"kd-bilstm"' in (p / STUDENT_DIR / "config.json").read_text()]
    tokenizer = load_tokenizer(str(bilstm))
    assert len(tokenizer) < 5000 and load_classifier(str(bilstm), 2).config.vocab_size == len(tokenizer)
