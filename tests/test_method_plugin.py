"""A method is one module and one search space: a toy method written outside the repository, registered at test
time, validates, passes the pre-Ray checks, gets a search space and distils a tiny student with no other edit."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from kd.batching import LABEL, TEXT_A
from kd.methods import METHODS
from pipeline import search_space
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, validate
from pipeline.preflight import check_students_fit_teacher
from stages.config import TaskConfig, TeacherConfig
from stages.distill import student_job
from kd.layout import STUDENT_DIR
from kd.worker import LocalIO, train_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY_MODULE = '''
"""Soft targets plus a hidden-state MSE on a uniform layer map, weighted by one parameter."""

from pydantic import Field

from kd.layer_maps import expand_strategy
from kd.losses import get_loss, kl_divergence
from kd.methods import Method, MethodParams, register_method


class ToyParams(MethodParams):
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the soft term; 1 - alpha: the hidden one.")


@register_method
class ToyKD(Method):
    name = "toy_kd"
    Params = ToyParams
    online_signals = frozenset({"logits", "hidden_states"})
    student_outputs = frozenset({"hidden_states"})

    def layer_matches(self, n_teacher, n_student):
        return expand_strategy("uniform", n_teacher, n_student, feature="hidden", loss="mse")

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        soft = kl_divergence(student_out.logits, teacher_out.logits)
        hidden = soft.new_zeros(())
        for match in self.layer_matches(len(teacher_out.hidden_states) - 1, len(student_out.hidden_states) - 1):
            hidden = hidden + get_loss(match.loss)(student_out.hidden_states[match.student_layer],
                                                   teacher_out.hidden_states[match.teacher_layer],
                                                   batch.get("attention_mask"))
        return {"kd": soft, "hidden": hidden, "total": self.params.alpha * soft + (1 - self.params.alpha) * hidden}
'''

TOY_SPACE = """
space:
  params.alpha: {uniform: [0.1, 0.9]}
  train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
"""


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """The toy module imported by path and its search space in a tune_spaces folder of its own; afterwards the
    registry is as it was, so other tests never see it."""
    path = tmp_path / "toy_kd.py"
    path.write_text(TOY_MODULE)
    spec = importlib.util.spec_from_file_location("toy_kd_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    spaces = tmp_path / "tune_spaces"
    spaces.mkdir()
    (spaces / "toy_kd.yaml").write_text(TOY_SPACE)
    monkeypatch.setattr(search_space, "SPACES_DIR", spaces)
    yield module
    METHODS.pop("toy_kd", None)
    sys.modules.pop("toy_kd_plugin", None)


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    """A tiny random BERT classifier saved as a teacher artifact (its model under ``STUDENT_DIR``)."""
    folder = tmp_path / "teacher"
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(folder / STUDENT_DIR)
    tiny_tokenizer.save_pretrained(folder / STUDENT_DIR)
    return folder


def experiment(teacher_dir, **student) -> dict:
    entry = {"name": "toy", "method": "toy_kd", "student": {"layers": 2}, "train": {"epochs": 1, "batch_size": 4},
             **student}
    return {"name": "plugin", "teacher": {"source": str(teacher_dir / STUDENT_DIR), "max_length": 16},
            "students": [entry]}


def test_a_registered_method_validates_with_its_own_params(toy_method, teacher_dir):
    spec = validate(experiment(teacher_dir, params={"alpha": 0.25})).students[0]
    assert isinstance(spec.params, toy_method.ToyParams) and spec.params.alpha == 0.25
    method = spec.method_object()
    assert isinstance(method, toy_method.ToyKD) and method is spec.method_object()
    assert (method.teacher_signals(), method.ensemble_temperature(), method.reads_mlm_teacher()) == ("online", 1.0, False)


@pytest.mark.parametrize("params, message", [
    ({"alpha": 2}, "students[0].params.alpha: Input should be less than or equal to 1"),
    ({"beta": 1}, "students[0].params.beta: unknown field"),
])
def test_bad_params_of_a_registered_method_name_their_field(toy_method, teacher_dir, params, message):
    with pytest.raises(ConfigError) as error:
        validate(experiment(teacher_dir, params=params))
    assert message in str(error.value)


def test_an_unregistered_method_is_unknown(teacher_dir):
    with pytest.raises(ConfigError, match=r"students\[0\]\.method: unknown method 'toy_kd'; known: bilstm"):
        validate(experiment(teacher_dir))


def test_a_registered_method_passes_the_checks_before_ray(toy_method, teacher_dir):
    check_students_fit_teacher(validate(experiment(teacher_dir)))
    with pytest.raises(ConfigError, match=r"students\[0\] \(toy\)\.student\.layers: 5 is deeper"):
        check_students_fit_teacher(validate(experiment(teacher_dir, student={"layers": 5})))


def test_a_registered_method_has_a_search_space(toy_method, teacher_dir):
    base = experiment(teacher_dir)["students"][0]
    space = search_space.load_space("toy_kd", base)
    assert set(space.space) == {"params.alpha", "train.learning_rate"}
    (search_space.SPACES_DIR / "toy_kd.yaml").write_text("space:\n  params.alpha: {uniform: [0.5, 1.5]}\n")
    with pytest.raises(ConfigError, match="params.alpha = 1.5 does not fit"):
        search_space.load_space("toy_kd", base)


def test_a_registered_method_distils_a_tiny_student(toy_method, teacher_dir, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    frame = pd.DataFrame({TEXT_A: ["a good film", "a bad plot", "the actor is great", "not very fun"] * 2,
                          LABEL: [1, 0, 1, 0] * 2})
    frame.to_parquet(data_dir / "train.parquet")
    frame.to_parquet(data_dir / "dev.parquet")
    (data_dir / "result.json").write_text('{"rows": {"train": 8}}')
    inputs = {"teacher": Artifact("teacher", "t", teacher_dir), "data": Artifact("data", "d", data_dir)}
    spec = validate(experiment(teacher_dir)).students[0]
    cfg = SimpleNamespace(teacher=TeacherConfig(max_length=16), task=TaskConfig(source="x.csv", labels=[0, 1]),
                          ray=SimpleNamespace(threads_per_worker=1))
    job, train_path = student_job(cfg, spec, inputs)
    reports = []
    distiller = train_student(job, LocalIO(train_path, data_dir / "dev.parquet",
                                           report=lambda metrics, _: reports.append(metrics)), verbose=False)
    assert type(distiller.method).__name__ == "ToyKD" and distiller.student.config.num_hidden_layers == 2
    assert len(reports) == 1 and all(math.isfinite(reports[0][f"loss/{key}"]) for key in ("kd", "hidden", "total"))
    assert 0 <= reports[0]["dev_accuracy"] <= 1
