"""Students built from a teacher, the pure-PyTorch training loop, and resumable state."""

import time

import torch
from transformers import AutoModelForSequenceClassification

from kd.batching import Collator
from kd.evaluation import measure_latencies, measure_latency, task_metrics
from kd.methods import get_method
from kd.students import StudentShape, build_student, count_parameters
from kd.training import Distiller, TrainSettings

import numpy as np
import pytest

TEXTS = ["good movie", "bad plot", "great actor", "awful film", "very fun", "dull plot", "not good", "the film was fun"]
LABELS = [1, 0, 1, 0, 1, 0, 0, 1]


def batch(tokenizer, with_teacher_logits=False):
    rows = {"text_a": np.array(TEXTS), "label": np.array(LABELS)}
    if with_teacher_logits:  # a confident teacher that agrees with the gold labels
        rows["teacher_logits"] = np.where(np.array(LABELS)[:, None] == 1, [-2.0, 2.0], [2.0, -2.0])
    return Collator(tokenizer, 16)(rows)


def test_student_copies_the_chosen_teacher_layers(tiny_teacher):
    student = build_student(tiny_teacher, StudentShape(layers=2, init=[2, 4]))
    assert student.config.num_hidden_layers == 2
    for student_index, teacher_layer in enumerate([2, 4]):
        got = student.bert.encoder.layer[student_index].state_dict()
        want = tiny_teacher.bert.encoder.layer[teacher_layer - 1].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(student.classifier.weight, tiny_teacher.classifier.weight)
    assert count_parameters(student) < count_parameters(tiny_teacher)


def test_narrower_student_starts_random_with_its_own_width(tiny_teacher):
    student = build_student(tiny_teacher, StudentShape(layers=2, hidden_size=8, init="random"))
    assert student.config.hidden_size == 8 and student.config.intermediate_size == 32


@pytest.mark.parametrize("method_name, copied", [("kd", [2, 4]), ("distilbert", [1, 3]), ("pkd", [1, 2])])
def test_unset_init_takes_the_method_default(tiny_teacher, method_name, copied):
    student = get_method(method_name)().build_student(tiny_teacher, StudentShape(layers=2))
    for student_index, teacher_layer in enumerate(copied):
        got = student.bert.encoder.layer[student_index].state_dict()
        want = tiny_teacher.bert.encoder.layer[teacher_layer - 1].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_shape_refuses_mismatched_init_list():
    with pytest.raises(ValueError, match="init lists 1 teacher layers"):
        StudentShape(layers=2, init=[1])


def test_student_saves_and_loads_with_auto_class(tiny_teacher, tiny_tokenizer, tmp_path):
    student = build_student(tiny_teacher, StudentShape(layers=2, init="uniform"))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    b = batch(tiny_tokenizer)
    student.eval()
    ids = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert torch.allclose(student(**ids).logits, loaded(**ids).logits)


@pytest.mark.parametrize("method_name, term", [("kd", "kd"), ("finetune", "total")])
def test_distiller_lowers_the_loss(tiny_teacher, tiny_tokenizer, method_name, term):
    torch.manual_seed(0)
    method = get_method(method_name)({"temperature": 1.0} if method_name == "kd" else {})
    student = method.build_student(tiny_teacher, StudentShape(layers=2, init="random"))
    distiller = Distiller(method, student, None, TrainSettings(learning_rate=5e-3, warmup_ratio=0, epochs=1), 30)
    b = batch(tiny_tokenizer, with_teacher_logits=True)
    losses = [distiller.step(b)[term] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


def test_epoch_reports_every_n_steps_and_finishes_phase(tiny_teacher, tiny_tokenizer):
    method = get_method("kd")()
    distiller = Distiller(method, build_student(tiny_teacher, StudentShape(layers=1, init="uniform")), None,
                          TrainSettings(epochs=1, report_every=2), 4)
    reports = []
    distiller.run_epoch([batch(tiny_tokenizer, with_teacher_logits=True)] * 4, reports.append)
    assert [r["step"] for r in reports] == [2, 4] and distiller.finished


def test_state_round_trip_resumes_where_it_stopped(tiny_teacher, tiny_tokenizer, tmp_path):
    method = get_method("kd")()
    settings = TrainSettings(epochs=2)
    first = Distiller(method, build_student(tiny_teacher, StudentShape(layers=1, init="uniform")), None, settings, 2)
    first.run_epoch([batch(tiny_tokenizer, with_teacher_logits=True)] * 2, lambda _: None)
    first.save_state(tmp_path)
    second = Distiller(method, build_student(tiny_teacher, StudentShape(layers=1, init="random")), None, settings, 2)
    second.load_state(tmp_path)
    assert second.progress.epoch == 1 and second.progress.global_step == 2
    for a, b in zip(first.module.parameters(), second.module.parameters()):
        assert torch.equal(a, b)
    assert second.scheduler.last_epoch == first.scheduler.last_epoch


def test_task_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    metrics = task_metrics(logits, np.array([0, 1, 1, 1]))
    assert metrics["accuracy"] == 0.75 and metrics["f1"] == pytest.approx(0.8)
    regression = task_metrics(np.array([[0.1], [0.4], [0.9]]), np.array([0.0, 0.5, 1.0]), regression=True)
    assert regression["spearman"] == pytest.approx(1.0)


def test_latency_harness_reports_positive_figures(tiny_teacher, tiny_tokenizer):
    timing = measure_latency(tiny_teacher, batch(tiny_tokenizer), warmup=1, repeats=2, threads=1)
    assert timing["latency_ms"] > 0 and timing["batch_size"] == len(TEXTS)


class SlowModel(torch.nn.Module):
    """Sleeps ``seconds`` a call and logs its name: what a timing harness sees, without a real forward pass."""

    def __init__(self, name: str, seconds: float, calls: list[str]):
        super().__init__()
        self.name, self.seconds, self.calls = name, seconds, calls

    def forward(self, input_ids, **_):
        self.calls.append(self.name)
        time.sleep(self.seconds)
        return input_ids


def test_models_timed_together_take_turns_within_every_repeat():
    calls: list[str] = []
    models = [SlowModel("fast", 0.001, calls), SlowModel("slow", 0.02, calls)]
    batches = [{"input_ids": torch.zeros(4, 3, dtype=torch.long)}, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}]
    fast, slow = measure_latencies(models, batches, warmup=1, repeats=3, threads=1)
    assert calls == ["fast", "slow"] * 4  # one warm-up round, then three timed rounds, the models in turn
    assert 1 <= fast["latency_ms"] < 15 <= slow["latency_ms"] < 200
    assert (fast["batch_size"], slow["batch_size"]) == (4, 2)
    assert slow["throughput"] == pytest.approx(2 / (slow["latency_ms"] / 1000))


def test_predict_frame_keeps_row_order(tiny_teacher, tiny_tokenizer):
    import pandas as pd

    from kd.evaluation import predict_frame

    frame = pd.DataFrame({"text_a": ["the film was very fun and good", "bad", "great actor", "not good at all"]})
    collator = Collator(tiny_tokenizer, 16)
    sorted_logits = predict_frame(tiny_teacher, collator, frame, batch_size=2)
    tiny_teacher.eval()
    one_by_one = np.concatenate([tiny_teacher(**collator.encode({"text_a": np.array([t])})).logits.detach().numpy()
                                 for t in frame.text_a])
    assert np.allclose(sorted_logits, one_by_one, atol=1e-5)
