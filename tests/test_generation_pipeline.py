"""A generation task through the whole pipeline on the shared local Ray: 200 synthetic pairs, a tiny random masked LM
as the checkpoint the C-MLM teacher is fine-tuned from, a cmlm and an nll student of one shape. The run writes
BLEU for both into summary.json with a paired bootstrap of cmlm against nll, the report, and registers the best
student as a text-to-text model. Validation of generation experiments runs without Ray."""

from __future__ import annotations


import mlflow
import pandas as pd
import pytest
import torch
from rich.console import Console
from transformers import BertForMaskedLM
from typer.testing import CliRunner

from conftest import reversed_pairs, tiny_bert_config
from pipeline.cli import app
from pipeline.config import ConfigError, load_experiment
from pipeline.summary_schema import GenerationSummary
from stages.serving_model import GENERATED, TEXT

CONFIG = "configs/wordnet_definitions.yaml"
LENGTHS = {"max_source_length": 10, "max_target_length": 10}


def overrides(pairs_file, teacher_dir) -> list[str]:
    """The shipped offline config, cut down: the pairs file, the tiny teacher, a few steps of everything."""
    train = "{epochs: 2, batch_size: 16, learning_rate: 3.0e-3, report_every: 5}"
    shape = "{layers: 1, init_from: pretrained}"
    lengths = ", ".join(f"{name}: {value}" for name, value in LENGTHS.items())
    return [f"task={{source: {pairs_file}, task_type: seq2seq}}", f"teacher.source={teacher_dir}",
            f"cmlm={{steps: 20, batch_size: 16, learning_rate: 1.0e-3, k: 4, rounds: 2, temperature: 2.0, {lengths}}}",
            f"students=[{{name: cmlm_1L, method: cmlm, student: {shape}, train: {train}, "
            f"params: {{alpha: 0.5, temperature: 2.0, k: 4, {lengths}}}}}, "
            f"{{name: nll_1L, method: nll, student: {shape}, train: {train}, params: {{{lengths}}}}}]",
            "label={batch_size: 64, actors: 1, threads_per_actor: 1}", "ray.torch_threads=1",
            "evaluate={num_beams: 2, max_new_tokens: 12, latency_batch_size: 8, latency_repeats: 2, threads: 1}"]


@pytest.fixture(scope="module")
def generation_inputs(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("generation")
    pairs_file = folder / "pairs.parquet"
    reversed_pairs(200, 0).to_parquet(pairs_file, index=False)
    torch.manual_seed(0)
    teacher_dir = folder / "checkpoint"
    BertForMaskedLM(tiny_bert_config(num_hidden_layers=2)).save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    return folder, pairs_file, teacher_dir


@pytest.mark.ray
@pytest.mark.e2e
def test_a_generation_task_runs_end_to_end_with_bleu_a_bootstrap_and_a_text_to_text_model(ray_session,
                                                                                         generation_inputs):
    from pipeline.runner import PipelineRunner

    folder, pairs_file, teacher_dir = generation_inputs
    experiment = load_experiment(CONFIG, overrides(pairs_file, teacher_dir), workdir=folder / "work")
    runner = PipelineRunner(experiment, Console(width=160))
    runner.run()
    assert set(runner.done) == {"data", "C-MLM teacher", "C-MLM top-k", "distill cmlm_1L (cmlm)",
                                "distill nll_1L (nll)", "evaluate cmlm_1L", "evaluate nll_1L"}

    summary = GenerationSummary.model_validate_json((experiment.workdir / "summary.json").read_text())
    assert summary.kind == "generation" and summary.soft_targets.rows == 160  # 80% of 200 pairs train
    assert 0 <= summary.teacher.masked_accuracy_before <= 1 and summary.teacher.steps == 20
    cmlm, nll = summary.students["cmlm_1L"], summary.students["nll_1L"]
    for student in (cmlm, nll):
        assert 0 <= student.test["bleu"] <= 100 and 0 <= student.test["rougeL"] <= 1
        assert student.test["sentences"] == 20 and student.sentences_per_second > 0
        assert student.encoder_layers == 1 and student.init_from == "pretrained"
    assert nll.baseline and nll.against_baseline is None
    test = cmlm.against_baseline
    assert test.baseline == "nll_1L" and 0 < test.p_value <= 1 and test.ci95[0] <= test.difference <= test.ci95[1]
    report = (experiment.workdir / "report.md").read_text()
    assert "## Paired bootstrap against the baseline" in report and "| cmlm_1L | cmlm | pretrained |" in report
    assert (experiment.workdir / "report_bleu.png").stat().st_size > 1000

    # A rerun recomputes nothing.
    again = PipelineRunner(experiment, Console(width=160))
    again.run()
    assert again.counts == {"ran": 0, "cached": 7}

    # The best student (on dev BLEU) registers as a pyfunc that takes source text and returns generated text.
    result = CliRunner().invoke(app, ["register", str(experiment.workdir), "best", "--name", "tiny-generator"])
    assert result.exit_code == 0, result.output
    model = mlflow.pyfunc.load_model("models:/tiny-generator@candidate")
    sources = reversed_pairs(3, 9)["source"].tolist()
    generated = model.predict(pd.DataFrame({TEXT: sources}))[GENERATED].tolist()
    assert len(generated) == 3 and all(isinstance(text, str) for text in generated)
    chosen = max(summary.students, key=lambda name: summary.students[name].dev["bleu"])
    evaluated = (summary.students[chosen].evaluate_dir / "test_beam.txt").read_text().split("\n")[:-1]
    assert evaluated  # what the evaluation wrote is what the served model says for the same sources
    test_sources = pd.read_parquet(summary.data_dir / "test.parquet")["source"].tolist()
    served = model.predict(pd.DataFrame({TEXT: test_sources}))[GENERATED].tolist()
    assert served == evaluated


@pytest.mark.ray
@pytest.mark.e2e
def test_a_search_of_a_generation_method_times_its_trials_and_registers_a_generator(ray_session, generation_inputs):
    from pipeline.search import run_tune

    folder, pairs_file, teacher_dir = generation_inputs
    searched = load_experiment(CONFIG, [*overrides(pairs_file, teacher_dir), "tune={samples: 2, scheduler: fifo}",
                                        "students.cmlm_1L.train.epochs=1", "tune.registry_name=tiny-cmlm-search"],
                               workdir=folder / "work")
    outcome = run_tune(searched, "cmlm", console=Console(width=160))
    records = outcome["records"]
    assert len(records) == 2 and all(r["dev_token_accuracy"] is not None for r in records)
    assert all(r["sentences_per_second"] > 0 and "speedup" not in r for r in records)
    best = outcome["best"]
    assert 0 <= best["test"]["bleu"] <= 100 and best["test"]["sentences"] == 20
    tags = mlflow.MlflowClient().get_model_version("tiny-cmlm-search", str(outcome["registered"]["version"])).tags
    assert tags["method"] == "cmlm" and "test_bleu" in tags and float(tags["sentences_per_second"]) > 0
    model = mlflow.pyfunc.load_model("models:/tiny-cmlm-search@candidate")
    assert len(model.predict(pd.DataFrame({TEXT: ["film good"]}))[GENERATED]) == 1


def test_a_generation_experiment_validates_against_its_cmlm_section(generation_inputs):
    folder, pairs_file, teacher_dir = generation_inputs
    assert load_experiment(CONFIG, overrides(pairs_file, teacher_dir)).cmlm.k == 4
    with pytest.raises(ConfigError) as error:
        load_experiment(CONFIG, ["cmlm.max_target_length=32"])
    assert "students[0] (cmlm_2L).params.max_target_length: 64, but cmlm.max_target_length is 32" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_experiment(CONFIG, ["students.cmlm_2L.params.k=16", "students.cmlm_2L.params.temperature=2.0"])
    message = str(error.value)
    assert "params.k: 16, but the cmlm_topk stage keeps cmlm.k = 8" in message
    assert "params.temperature: 2, but the teacher is read at cmlm.temperature = 10" in message
    with pytest.raises(ConfigError) as error:
        load_experiment(CONFIG, ["students.nll_2L.student.init_from=general:x"])
    assert "nll builds a student of its own kind, which takes no student.embedding_size and student.init_from " \
           "pretrained or teacher only" in str(error.value)
    with pytest.raises(ConfigError, match=r"general\[0\] \(g\): a generation task's students start from"):
        load_experiment(CONFIG, ["general=[{name: g, student: {layers: 2}}]"])


def test_the_paper_setting_validates_and_reads_a_translation_column():
    experiment = load_experiment("configs/cmlm_iwslt.yaml")
    assert experiment.task.source_column == "translation.de" and experiment.cmlm.max_source_length == 128
    from stages.data import hub_dataset, pair_column

    assert hub_dataset("IWSLT/iwslt2017/iwslt2017-de-en") == ("IWSLT/iwslt2017", "iwslt2017-de-en")
    assert hub_dataset("glue/sst2") == ("nyu-mll/glue", "sst2") and hub_dataset("wikitext") == ("wikitext", None)
    frame = pd.DataFrame({"translation": [{"de": "ein Film", "en": "a film"}, {"de": "gut", "en": "good"}]})
    assert pair_column(frame, "translation.en").tolist() == ["a film", "good"]
    assert pair_column(frame, "translation.fr") is None and pair_column(frame, "missing") is None


def test_validate_checks_the_pair_lengths_against_the_teacher_positions(generation_inputs):
    folder, pairs_file, teacher_dir = generation_inputs
    arguments = [part for override in overrides(pairs_file, teacher_dir) for part in ("--set", override)]
    assert CliRunner().invoke(app, ["validate", CONFIG, *arguments]).exit_code == 0
    longer = [*arguments, "--set", "cmlm.max_source_length=60", "--set", "students.0.params.max_source_length=60",
              "--set", "students.1.params.max_source_length=60"]
    result = CliRunner().invoke(app, ["validate", CONFIG, *longer])
    assert result.exit_code == 2 and "= 73 positions, but" in result.output and "has 64" in result.output
    assert "Traceback" not in result.output
