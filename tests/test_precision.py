"""train.precision: auto takes bf16 only where the device has it natively; explicit settings are honoured; the
training loop autocasts by the resolved precision, and a run says which one it chose and why."""

import shutil
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from kd import precision
from kd.batching import LABEL, TEXT_A, Collator
from kd.methods import get_method
from kd.precision import resolve_precision
from kd.students import StudentShape, build_student
from kd.training import Distiller, TrainSettings
from kd.worker import LocalIO, train_job, train_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_BF16 = {"avx2", "avx512_f", "avx512_vnni", "fma3"}


@pytest.fixture
def flags(monkeypatch):
    """Stand in for the CPU's feature flags."""

    def use(found: set[str]) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: found)

    return use


def test_auto_takes_fp32_on_a_cpu_without_native_bf16(flags):
    flags(NO_BF16)
    assert resolve_precision("auto", torch.device("cpu")) == (
        "fp32", "fp32: this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag)")


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_takes_bf16_on_a_cpu_with_native_bf16(flags, flag):
    flags(NO_BF16 | {flag})
    chosen, reason = resolve_precision("auto", "cpu")
    assert chosen == "bf16" and reason == f"bf16: this CPU has native bf16 ({flag})"


@pytest.mark.parametrize("found", [NO_BF16, NO_BF16 | {"avx512_bf16", "amx_bf16"}])
def test_explicit_settings_are_honoured(flags, found):
    flags(found)
    assert resolve_precision("fp32", "cpu") == ("fp32", "fp32: set by train.precision")
    chosen, reason = resolve_precision("bf16", "cpu")
    assert chosen == "bf16" and reason.startswith("bf16: set by train.precision")
    assert ("emulated" in reason) == ("avx512_bf16" not in found)


def test_auto_takes_fp32_where_it_cannot_check():
    assert resolve_precision("auto", "meta")[0] == "fp32"


def test_this_machine_resolves_by_its_own_flags():
    native = bool({"avx512_bf16", "amx_bf16"} & precision.cpu_flags())
    assert resolve_precision("auto", "cpu")[0] == ("bf16" if native else "fp32")


def test_auto_is_the_default():
    assert TrainSettings().precision == "auto"
    with pytest.raises(ValueError):
        TrainSettings(precision="fp16")


@pytest.mark.parametrize("found, dtype", [(NO_BF16, torch.float32), (NO_BF16 | {"avx512_bf16"}, torch.bfloat16)])
def test_training_step_autocasts_by_the_resolved_precision(flags, tiny_teacher, tiny_tokenizer, found, dtype):
    flags(found)
    method = get_method("finetune")()
    distiller = Distiller(method, build_student(tiny_teacher, StudentShape(layers=1, init="uniform")), None,
                          TrainSettings(precision="auto"), 1)
    seen = []
    distiller.student.classifier.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    distiller.step(Collator(tiny_tokenizer, 16)({TEXT_A: np.array(["good movie", "bad plot"]), LABEL: np.array([1, 0])}))
    assert seen == [dtype]


def test_training_says_which_precision_it_chose_and_records_it_first(flags, tiny_tokenizer, tmp_path, capsys):
    flags(NO_BF16)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    rows = pd.DataFrame({TEXT_A: ["good movie", "bad plot", "great actor", "dull film"], LABEL: [1, 0, 1, 0]})
    rows.to_parquet(tmp_path / "train.parquet")
    rows.to_parquet(tmp_path / "dev.parquet")
    job = train_job(method="finetune", params={}, shape={"layers": 1}, settings=TrainSettings(epochs=1, batch_size=4),
                    teacher=str(teacher), init_model=None, tokenizer=str(teacher), max_length=16, num_labels=2,
                    regression=False, train_rows=len(rows), train_path=str(tmp_path / "train.parquet"), torch_threads=1)
    checkpoint = tmp_path / "checkpoint"

    def keep(metrics, directory):
        shutil.copytree(directory, checkpoint, dirs_exist_ok=True)

    history = train_student(job, LocalIO(tmp_path / "train.parquet", tmp_path / "dev.parquet", keep)).progress.history
    reason = "fp32: this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag)"
    assert capsys.readouterr().out.splitlines()[0] == f"precision {reason}"
    assert history[0] == {"event": "precision", "precision": "fp32", "reason": reason}

    restored = LocalIO(tmp_path / "train.parquet", tmp_path / "dev.parquet", resume_from=lambda: nullcontext(checkpoint))
    history = train_student(job, restored, verbose=False).progress.history
    assert [record.get("event") for record in history].count("precision") == 1 and history[0]["event"] == "precision"
    assert history[-1]["event"] == "restored"
