"""General distillation: the objective, the packed sentence stream, a run that resumes where it stopped, the
Ray Train stage with two workers, and students that start from its encoder."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from rich.console import Console
from transformers import AutoModel, BertForMaskedLM, BertForSequenceClassification

from conftest import SMOKE_CONFIG, WORDS, tiny_bert_config
from kd.general import (GeneralDistillation, GeneralLosses, GeneralSettings, SentencePacker, general_job,
                        train_general)
from kd.layout import ENCODER_DIR, HISTORY_FILE
from kd.students import StudentShape, build_student
from kd.training import teacher_outputs


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(count)]


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny teacher without dropout: the student inherits its config, so a run is a function of its seeds and
    data alone, and a resumed run can be compared weight for weight."""
    torch.manual_seed(0)
    folder = tmp_path / "teacher"
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm_teacher")
    for where in (folder, tmp_path / "mlm_teacher"):
        tiny_tokenizer.save_pretrained(where)
    return folder


class StreamIO:
    """A worker's view of a corpus in this process: seeded passes over ``texts``, checkpoints kept in memory."""

    rank, world = 0, 1

    def __init__(self, texts: list[str], checkpoints: list[Path] | None = None, resume: Path | None = None):
        self.texts = np.array(texts)
        self.checkpoints = checkpoints if checkpoints is not None else []
        self.resume = resume
        self.lines: list[str] = []

    def epoch_chunks(self, rows_per_chunk, seed):
        order = np.random.default_rng(seed).permutation(len(self.texts))
        for start in range(0, len(order), rows_per_chunk):
            yield {"text": self.texts[order[start:start + rows_per_chunk]]}

    def restore(self):
        return nullcontext(self.resume)

    def report(self, metrics, directory):
        if directory is not None:
            kept = Path(str(directory) + "-kept")
            import shutil

            shutil.copytree(directory, kept)
            self.checkpoints.append(kept)

    def wrap(self, module, device):
        return module.to(device)

    def device(self):
        return torch.device("cpu")

    def progress(self, line):
        self.lines.append(line)


def job_for(teacher_dir: Path, **settings) -> dict:
    values = {"steps": 8, "batch_size": 4, "max_length": 24, "checkpoint_every": 4, "report_every": 2,
              "rows_per_chunk": 32, "precision": "fp32", **settings}
    return general_job(teacher=str(teacher_dir), mlm_head=None,
                       shape={"layers": 2, "hidden_size": 12, "embedding_size": 8, "init": "random"},
                       losses={}, settings=values, torch_threads=1)


# --- the objective ------------------------------------------------------------------------------------------


def test_a_copy_of_the_teacher_has_no_general_distillation_loss(tiny_teacher, one_torch_thread):
    """Embedding, attention, hidden and cosine terms all compare a model with itself: each is exactly 0, in train
    mode too (attention dropout 0.1 touches neither the scores nor the MSE)."""
    from kd.attention import SCORES_ATTENTION

    tiny_teacher.set_attn_implementation(SCORES_ATTENTION)
    objective = GeneralDistillation({"cosine": 1.0})
    student = build_student(tiny_teacher, StudentShape(layers=4, init="uniform"))
    student.set_attn_implementation(SCORES_ATTENTION)
    student.train()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])}
    batch["attention_mask"] = (batch["input_ids"] != 0).long()
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    student.eval()  # hidden dropout would make the copy differ; the attention scores are dropout-free anyway
    auxiliary = objective.auxiliary_modules(student, tiny_teacher.base_model)
    losses = objective.loss(objective.student_forward(student, batch, auxiliary, "general"),
                            teacher_outputs(objective, tiny_teacher.base_model.eval(), batch), batch, auxiliary,
                            "general")
    assert set(losses) == {"embedding", "attention", "hidden", "cosine", "total"}
    assert all(value.item() == pytest.approx(0.0, abs=1e-6) for value in losses.values())


def test_loss_weights_and_masked_terms_are_validated():
    with pytest.raises(ValidationError, match="every loss weight is 0"):
        GeneralLosses(embedding=0, attention=0, hidden=0)
    with pytest.raises(ValueError, match="need the masked-LM teacher's head"):
        GeneralDistillation({"mlm": 1.0})
    assert GeneralDistillation({"attention": 0}).online_signals == {"hidden_states"}


def test_settings_split_the_steps_into_checkpointed_segments():
    settings = GeneralSettings(steps=10, checkpoint_every=4)
    assert (settings.segments, settings.steps_per_segment) == (3, 4)
    assert settings.train_settings().epochs == 3


# --- the stream ---------------------------------------------------------------------------------------------


def test_packer_fills_blocks_with_whole_sentences_and_counts_them(tiny_tokenizer):
    packer = SentencePacker(tiny_tokenizer, max_length=8)  # 6 tokens of room between [CLS] and [SEP]
    blocks = list(packer.blocks([["the movie", "good plot", "very fun"], ["a bad actor was dull not fun ok"]]))
    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    # Three 2-token sentences fill the first block exactly; the fourth sentence does not fit beside them.
    assert [len(block) for block, _ in blocks] == [8, 8]
    assert [consumed for _, consumed in blocks] == [3, 4]
    assert all(block[0] == cls and block[-1] == sep for block, _ in blocks)
    # The over-long sentence fills a block of its own, cut to fit.
    assert tiny_tokenizer.decode(blocks[1][0][1:-1]).startswith("a bad actor")


# --- a run in this process ----------------------------------------------------------------------------------


def test_the_student_learns_the_teacher_and_a_resumed_run_ends_as_an_uninterrupted_one(teacher_dir, one_torch_thread):
    texts = sentences(120)
    whole = StreamIO(texts)
    uninterrupted = train_general(job_for(teacher_dir), whole, verbose=False)
    segments = [record for record in uninterrupted.progress.history if "sentences_per_second" in record]
    assert [record["step"] for record in segments] == [4, 8]
    assert whole.lines[-1].startswith("[general] step 8/8 loss")
    assert segments[-1]["loss/total"] < segments[0]["loss/total"]

    # A run that died after its first checkpoint, restarted from it.
    resumed = train_general(job_for(teacher_dir), StreamIO(texts, resume=whole.checkpoints[0]), verbose=False)
    assert any(record.get("event") == "restored" for record in resumed.progress.history)
    for (name, a), (_, b) in zip(uninterrupted.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    encoder = whole.checkpoints[-1] / ENCODER_DIR
    assert AutoModel.from_pretrained(encoder).config.embedding_size == 8
    assert json.loads((whole.checkpoints[-1] / HISTORY_FILE).read_text())[-1]["step"] == 8


def test_the_masked_lm_terms_train_the_students_head_against_the_masked_lm_teacher(teacher_dir, one_torch_thread):
    job = job_for(teacher_dir, steps=4, checkpoint_every=2)
    job.update(losses={"mlm": 1.0, "soft_mlm": 1.0, "cosine": 1.0}, mlm_head=str(teacher_dir.parent / "mlm_teacher"))
    distiller = train_general(job, StreamIO(sentences(120)), verbose=False)
    last = [record for record in distiller.progress.history if "sentences_per_second" in record][-1]
    assert {"loss/mlm", "loss/soft_mlm", "loss/cosine", "loss/hidden"} <= set(last)
    assert all(np.isfinite(value) for key, value in last.items() if key.startswith("loss/"))
    # The teacher's side of the head is frozen; the student's is trained.
    auxiliary = distiller.module.auxiliary
    assert not any(p.requires_grad for p in auxiliary["teacher_mlm"].parameters())
    assert any(p.requires_grad for p in auxiliary["mlm"].parameters())


def test_a_corpus_too_small_for_one_batch_is_refused(teacher_dir, one_torch_thread):
    with pytest.raises(ValueError, match="fewer than 4 blocks"):
        train_general(job_for(teacher_dir, max_length=200), StreamIO(sentences(3)), verbose=False)


def test_a_corpus_without_text_is_refused_by_the_worker_that_reads_it(teacher_dir, one_torch_thread):
    with pytest.raises(ValueError, match="the corpus gave this worker no text"):
        train_general(job_for(teacher_dir), StreamIO([]), verbose=False)


# --- through Ray and the pipeline ---------------------------------------------------------------------------


def general_overrides(corpus: Path, workers: int = 1) -> list[str]:
    general = (f"general=[{{name: small, corpus: {{source: {corpus}}}, student: {{layers: 2, hidden_size: 128, "
               "embedding_size: 64, attention_heads: 2}, train: {steps: 6, batch_size: 8, max_length: 32, "
               "checkpoint_every: 3, report_every: 3}}]")
    train = "train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-3, report_every: 7}"
    # One student: its run's Ray Train start-up is the test's cost, and what it checks needs only one.
    students = f"students=[{{name: kd_small, method: kd, student: {{layers: 2, init_from: 'general:small'}}, {train}}}]"
    return [general, students, f"ray.num_workers={workers}", "ray.cpus_per_worker=0.5", "ray.torch_threads=1"]


@pytest.mark.ray
@pytest.mark.e2e
def test_two_workers_distil_an_encoder_that_a_student_starts_from(smoke_pipeline, tmp_path):
    from pipeline.config import load_experiment
    from pipeline.runner import PipelineRunner

    exp, _, _ = smoke_pipeline
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(400)) + "\n")
    experiment = load_experiment(SMOKE_CONFIG, general_overrides(corpus, workers=2), workdir=exp.workdir)
    runner = PipelineRunner(experiment, Console(width=160))
    students = runner.run()["students"]

    general = runner.done["general distillation (small)"]
    result = general.result()
    assert result["workers"] == 2 and result["sentences_per_second"] > 0
    assert [r["step"] for r in result["history"] if "sentences_per_second" in r] == [3, 6]
    # The student kept the encoder's shape and weights where they fit: its embeddings are the distilled ones.
    encoder = AutoModel.from_pretrained(general.path / ENCODER_DIR)
    student = AutoModel.from_pretrained(runner.done["distill kd_small (kd)"].path / "student")
    assert student.config.embedding_size == 64 and student.config.num_hidden_layers == 2
    assert students["kd_small"]["parameters"]["embedding_size"] == 64
    assert students["kd_small"]["init"]["from"] == "general:small"
    assert encoder.config.hidden_size == 128

    # The encoder registers as a base model: text in, its 128-wide sentence embedding out.
    import mlflow
    from typer.testing import CliRunner

    from pipeline.cli import app
    from stages.serving_model import EMBEDDING, TEXT

    result = CliRunner().invoke(app, ["register", str(exp.workdir), "general:small"])
    assert result.exit_code == 0 and "general:small → registered smoke-general-small" in result.output, result.output
    model = mlflow.pyfunc.load_model("models:/smoke-general-small@candidate")
    embeddings = model.predict(pd.DataFrame({TEXT: sentences(3)}))[EMBEDDING]
    assert len(embeddings) == 3 and all(len(vector) == 128 for vector in embeddings)


# --- validation before any Ray work -------------------------------------------------------------------------


def validate_with(*overrides: str):
    from typer.testing import CliRunner

    from pipeline.cli import app

    arguments = [part for override in overrides for part in ("--set", override)]
    return CliRunner().invoke(app, ["validate", str(SMOKE_CONFIG), *arguments])


GENERAL = "general=[{name: g, student: {layers: 4, hidden_size: 256, embedding_size: 128, attention_heads: 4}}]"


def test_a_student_from_a_general_distillation_validates_and_must_fit_it():
    assert validate_with(GENERAL, "students.kd_2L.student.init_from=general:g").exit_code == 0
    deeper = validate_with(GENERAL, "students.kd_2L.student={layers: 5, init_from: 'general:g'}")
    assert deeper.exit_code == 2 and "5 layers, but general:g has 4" in deeper.output
    wider = validate_with(GENERAL, "students.kd_2L.student={layers: 2, hidden_size: 384, init_from: 'general:g'}")
    assert wider.exit_code == 2 and "hidden_size 384, but general:g has 256" in wider.output
    unknown = validate_with("students.kd_2L.student.init_from=general:nowhere")
    assert unknown.exit_code == 2 and "names general distillation 'nowhere'" in unknown.output


def test_a_shape_that_cannot_be_built_is_refused_before_any_ray_work():
    result = validate_with("general=[{name: g, student: {layers: 2, hidden_size: 250, attention_heads: 4}}]")
    assert result.exit_code == 2
    assert "general[0] (g).student: hidden_size 250 is not divisible by 4 attention heads" in result.output


def test_masked_lm_terms_need_the_masked_lm_teacher():
    result = validate_with("general=[{name: g, student: {layers: 2}, losses: {mlm: 1.0}}]")
    assert result.exit_code == 2 and "set teacher.mlm" in result.output
    soft = validate_with("general=[{name: g, student: {layers: 2}, losses: {soft_mlm: 1.0}}]")
    assert soft.exit_code == 2 and "set teacher: mlm" in soft.output


def test_a_checkpoint_that_is_not_a_bert_encoder_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = validate_with(f"students.kd_2L.student.init_from={tmp_path / 'gpt2'}")
    assert result.exit_code == 2, result.output
    assert "is a 'gpt2' model, not a BERT encoder" in result.output
    missing = validate_with(f"students.kd_2L.student.init_from={tmp_path / 'nothing'}")
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_methods_that_build_their_own_student_refuse_a_checkpoint_or_factorised_embeddings():
    bilstm = ("students=[{name: lstm, method: bilstm, data: task, student: {layers: 1, hidden_size: 300, "
              "init_from: 'general:g'}}]")
    result = validate_with(GENERAL, bilstm)
    assert result.exit_code == 2 and "bilstm builds a student of its own kind" in result.output
    dual = ("students=[{name: dual, method: dualtrain, student: {layers: 2, init_from: 'general:g'}, "
            "params: {vocab_size: 5000}}]")
    result = validate_with(GENERAL, dual)
    assert result.exit_code == 2 and "a student with embedding_size 128 cannot take it" in result.output
