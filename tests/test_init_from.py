"""student.init_from: a student's layers from the fine-tuned teacher, or from the pre-trained checkpoint the teacher
was fine-tuned from with a fresh classifier (the baseline a user would train without a teacher)."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from kd.batching import LABEL, TEXT_A
from pipeline.artifacts import Artifact
from stages.config import TaskConfig, TeacherConfig
from stages.distill import student_job
from kd.errors import StageError
from kd.layout import PRETRAINED_DIR, STUDENT_DIR
from kd.worker import LocalIO, build_distiller

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_model(folder, seed, tokenizer):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture
def artifacts(tmp_path, tiny_tokenizer):
    teacher_dir, data_dir = tmp_path / "teacher", tmp_path / "data"
    teacher = save_model(teacher_dir / STUDENT_DIR, 0, tiny_tokenizer)
    pretrained = save_model(teacher_dir / PRETRAINED_DIR, 1, tiny_tokenizer)
    data_dir.mkdir()
    frame = pd.DataFrame({TEXT_A: ["a good film", "a bad plot"] * 4, LABEL: [1, 0] * 4})
    frame.to_parquet(data_dir / "train.parquet")
    frame.to_parquet(data_dir / "dev.parquet")
    inputs = {"teacher": Artifact("teacher", "t", teacher_dir), "data": Artifact("data", "d", data_dir)}
    (data_dir / "result.json").write_text('{"rows": {"train": 8}}')
    return inputs, teacher, pretrained


def spec(init_from: str):
    from pipeline.config import validate

    document = {"name": "x", "task": {"source": "x.csv", "labels": [0, 1]},
                "students": [{"name": "s", "method": "finetune", "student": {"layers": 2, "init": [1, 3],
                                                                            "init_from": init_from},
                              "train": {"batch_size": 4}}]}
    return validate(document).students[0]


def config():
    return SimpleNamespace(teacher=TeacherConfig(max_length=16), task=TaskConfig(source="x.csv", labels=[0, 1]),
                           ray=SimpleNamespace(threads_per_worker=1))


def built_student(inputs, init_from):
    job, train_path = student_job(config(), spec(init_from), inputs)
    data = inputs["data"].path
    distiller, _ = build_distiller(job, LocalIO(data / "train.parquet", data / "dev.parquet"))
    return distiller.student


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("init_from", ["teacher", "pretrained"])
def test_layers_come_from_the_chosen_checkpoint_and_only_the_teacher_gives_its_classifier(artifacts, init_from):
    inputs, teacher, pretrained = artifacts
    source = teacher if init_from == "teacher" else pretrained
    student = built_student(inputs, init_from)
    assert same(student.bert.embeddings, source.bert.embeddings)
    assert same(student.bert.encoder.layer[0], source.bert.encoder.layer[0])
    assert same(student.bert.encoder.layer[1], source.bert.encoder.layer[2])
    assert not same(student.bert.encoder.layer[0], (pretrained if init_from == "teacher" else teacher).bert.encoder.layer[0])
    # The teacher's fine-tuned classifier is a transfer of its task knowledge: only init_from teacher takes it.
    assert same(student.classifier, teacher.classifier) == (init_from == "teacher")


def test_pretrained_init_needs_a_teacher_the_pipeline_fine_tuned(artifacts):
    inputs, _, _ = artifacts
    import shutil

    shutil.rmtree(inputs["teacher"].path / PRETRAINED_DIR)
    with pytest.raises(StageError, match="init_from: pretrained"):
        student_job(config(), spec("pretrained"), inputs)
