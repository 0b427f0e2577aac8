"""Regression tasks: every method that accepts one trains a one-output student on float labels and learns from
the teacher's score (not from a softmax over one column, which is constant), and the pipeline runs a regression
file end to end through local Ray."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console
from transformers import BertForSequenceClassification

from kd.attention import SCORES_ATTENTION
from kd.batching import TEACHER_LOGITS
from kd.methods import METHODS, get_method
from kd.students import StudentShape
from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS
from kd.training import Distiller, TrainSettings
from pipeline.config import validate
from pipeline.runner import PipelineRunner

from conftest import SMOKE_CONFIG, WORDS, tiny_bert_config, toy_batch

REGRESSION_METHODS = sorted(name for name, cls in METHODS.items()
                            if "regression" in cls.task_types and not cls.classification_only)
SOFT_TERMS = {"kd", "soft_ce", "mse"}  # the names methods give their term that reads the teacher's output
FLOAT_LABELS = torch.tensor([0.5, -1.0, 2.0, 0.0])  # -1.0 is a score like any other
# Per method, what keeps the tiny student tiny or the method on a path that needs no extra files.
PARAMS = {"distilbert": {"alpha_mlm": 0}, "bilstm": {"mlp_hidden": 8}}
SHAPES = {"bilstm": {"hidden_size": 8}, "mobilebert": {"hidden_size": 8}}


def test_every_method_but_the_classification_only_ones_accepts_regression():
    assert {"fastbert", "dualtrain"}.isdisjoint(REGRESSION_METHODS)
    assert {"kd", "finetune", "bilstm", "textsmooth", "distilbert", "pkd", "tinybert", "mobilebert"} <= set(
        REGRESSION_METHODS)


def regression_teacher() -> BertForSequenceClassification:
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_labels=1, hidden_dropout_prob=0.0))
    teacher.set_attn_implementation(SCORES_ATTENTION)
    return teacher.eval()


def regression_batch(teacher) -> dict[str, torch.Tensor]:
    batch = {**toy_batch(labels=False), "labels": FLOAT_LABELS}
    with torch.no_grad():
        batch[TEACHER_LOGITS] = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    k = 3
    batch[MLM_TOPK_IDS] = (batch["input_ids"].unsqueeze(-1) + torch.arange(1, k + 1)) % teacher.config.vocab_size
    batch[MLM_TOPK_PROBS] = torch.full((*batch["input_ids"].shape, k), 0.2, dtype=torch.float16)
    return batch


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", REGRESSION_METHODS)
def test_each_method_trains_a_regression_student_through_all_its_phases(name):
    teacher = regression_teacher()
    method = get_method(name)(PARAMS.get(name, {}))
    student = method.build_student(teacher, StudentShape(layers=2, **SHAPES.get(name, {})))
    if "attentions" in method.student_outputs:
        student.set_attn_implementation(SCORES_ATTENTION)
    distiller = Distiller(method, student, teacher, TrainSettings(epochs=1, learning_rate=1e-3, warmup_ratio=0),
                          steps_per_epoch=1)
    batch = regression_batch(teacher)
    with torch.no_grad():
        before = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert before.shape == (4, 1)
    seen = []
    while not distiller.finished:
        seen.append(distiller.run_epoch([batch], report=lambda _: None))
    assert len(seen) == len(method.phases())
    assert all(math.isfinite(value) for losses in seen for value in losses.values())
    soft = [value for losses in seen for term, value in losses.items() if term.removeprefix("loss/") in SOFT_TERMS]
    assert bool(soft) == method.uses_teacher and all(value > 0 for value in soft)
    with torch.no_grad():
        after = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.equal(before, after)


# ---- the pipeline on a regression file --------------------------------------------------------------------------

def regression_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """Sentences of the tiny tokenizer's words, scored by how many good words outweigh bad ones, plus noise."""
    rng = np.random.default_rng(seed)
    good, bad = {"good", "great", "fun"}, {"bad", "awful", "dull"}
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(n)]
    scores = [sum((w in good) - (w in bad) for w in s.split()) + rng.normal(scale=0.1) for s in sentences]
    return pd.DataFrame({"sentence": sentences, "score": scores})


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_pipeline_distils_a_regression_task(ray_session, tmp_path, tiny_tokenizer):
    # A teacher with its one-output head already: the teacher stage takes it as it is, which spares CI a Ray Train
    # run; the finetune student trains on the float labels through the same Ray Train path a teacher would.
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    source = tmp_path / "scores.csv"
    regression_rows(100).to_csv(source, index=False)
    document = yaml.safe_load(SMOKE_CONFIG.read_text())
    document.update(
        workdir=str(tmp_path / "run"), mlflow={"experiment": "regression"},
        task={"source": str(source), "task_type": "regression", "label_column": "score"},
        teacher={**document["teacher"], "source": str(teacher)},
    )
    exp = validate(document)
    summary = PipelineRunner(exp, Console(width=160)).run()

    assert summary["metric"] == "pearson" and not summary["teacher"]["fine_tuned"]
    assert set(summary["students"]) == {"kd_2L", "finetune_2L"}
    assert {student["method"] for student in summary["students"].values()} == {"kd", "finetune"}
    for student in summary["students"].values():
        assert {"pearson", "spearman"} <= set(student["dev"])
        assert all(math.isfinite(value) for value in student["dev"].values())
