"""A registered student loads and serves where this repository is not installed: tiny random students (BERT, a
sentence-pair BERT, and the custom BiLSTM, FastBERT and MobileBERT architectures) logged and registered the way the
pipeline does, loaded in a subprocess that cannot import kd, stages or pipeline, and served by `mlflow models serve`;
and `pipeline register WORKDIR STUDENT` for a student of a finished run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification
from typer.testing import CliRunner

from kd.batching import TEXT_A, TEXT_B, Collator
from kd.models.bilstm import BiLSTMConfig, BiLSTMForSequenceClassification
from kd.evaluation import predict_frame
from kd.models.fastbert import fastbert_from
from kd.models.mobilebert import BottleneckBertConfig, BottleneckBertForSequenceClassification
from pipeline.artifacts import ArtifactStore, content_key
from pipeline.cli import app
from pipeline.config import load_experiment
from pipeline.summary import load_summaries, write_summaries
from pipeline.summary_schema import StudentSummary, Summary, TeacherSummary
from pipeline.tracking import RUN_FILE, Tracker, remember_run
from stages import register
from kd.layout import STUDENT_DIR
from kd.checkpoints import load_classifier, load_tokenizer
from stages.serving_model import LABEL, PROBABILITIES, SCORE, TEXT, TEXT_PAIR

from conftest import SMOKE_CONFIG, WORDS, free_port, tiny_bert_config

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the movie was good", "a dull plot", "great actor", "the film is not very fun", "awful",
         "bad bad bad", "a great film", "the plot was dull and the actor awful"]
PAIRS = ["a good film", "the actor", "not fun", "the plot is great", "awful", "very dull", "a film", "good"]
STRING_LABELS = ["negative", "neutral", "positive"]
# Seeds at which each random student does not give every sentence one label, so that agreement means something.
STUDENTS = {"tiny-bert": 0, "tiny-bilstm": 1, "tiny-fastbert": 0, "tiny-mobilebert": 1, "tiny-bert-pair": 0}
LOAD_TIMEOUT_S, SERVE_TIMEOUT_S = 240, 240

# sitecustomize for the subprocesses: the venv installs this repository in editable mode, through a meta path finder
# (site-packages/__editable___kd_pipeline_*_finder.py) that serves kd, stages and pipeline from the working tree.
BLOCKER = textwrap.dedent('''
    import sys

    class RefuseRepository:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in ("kd", "stages", "pipeline"):
                raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)
            return None

    sys.meta_path[:] = [RefuseRepository] + [finder for finder in sys.meta_path
                                              if "__editable__" not in getattr(finder, "__module__", "")]
    sys.path[:] = [entry for entry in sys.path if entry != REPO]
''')

LOAD = textwrap.dedent('''
    import importlib, json, sys
    for package in ("kd", "stages", "pipeline"):
        try:
            importlib.import_module(package)
        except ImportError:
            continue
        raise SystemExit(f"{package} is importable")
    import mlflow, pandas as pd
    request = json.loads(sys.argv[1])
    predictions = {}
    for name, (version, frame) in request["models"].items():
        result = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(pd.DataFrame(frame))
        predictions[name] = {"label": result["label"].tolist(), "probabilities": [list(p) for p in result["probabilities"]]}
    loaded = [module.__name__ for module in list(sys.modules.values())
              if any(str(getattr(module, "__file__", None) or "").startswith(root) for root in request["roots"])]
    print(json.dumps({"predictions": predictions, "repository_modules": loaded}))
''')


def build_student(name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(STUDENTS[name])
    # A wide initialisation spreads the random students' predictions over the labels.
    if name == "tiny-bilstm":
        return BiLSTMForSequenceClassification(BiLSTMConfig(
            vocab_size=len(WORDS) + 5, embedding_dim=8, hidden_size=8, mlp_hidden=8, num_labels=num_labels,
            initializer_range=0.5))
    if name == "tiny-mobilebert":
        return BottleneckBertForSequenceClassification(BottleneckBertConfig(
            vocab_size=len(WORDS) + 5, hidden_size=8, intra_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=64, num_labels=num_labels, initializer_range=0.5))
    bert = BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, initializer_range=0.5))
    return fastbert_from(bert, branch_hidden_size=8) if name == "tiny-fastbert" else bert


def frame_of(exp) -> dict[str, list[str]]:
    return {TEXT: TEXTS, TEXT_PAIR: PAIRS} if exp.task.is_pair else {TEXT: TEXTS}


def evaluated(folder: Path, exp) -> tuple[list, np.ndarray]:
    """Labels and probabilities as the pipeline's evaluation computes them (stages.evaluate)."""
    model = load_classifier(str(folder), exp.task.num_labels)
    collator = Collator(load_tokenizer(str(folder)), exp.teacher.max_length)
    rows = pd.DataFrame({TEXT_A: TEXTS, TEXT_B: PAIRS} if exp.task.is_pair else {TEXT_A: TEXTS})
    logits = torch.from_numpy(predict_frame(model, collator, rows))
    return [exp.task.labels[i] for i in logits.argmax(-1).tolist()], logits.softmax(-1).numpy()


@contextmanager
def tracking_at(uri: str):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def registered_students(tmp_path_factory, tiny_tokenizer):
    """Every student logged with stages.register.log_student and registered with register.register, as a search
    registers its best trial, into a sqlite MLflow; with the predictions of the pipeline's own evaluation."""
    root = tmp_path_factory.mktemp("registry")
    named = load_experiment(SMOKE_CONFIG, [f"task.labels=[{', '.join(STRING_LABELS)}]"], workdir=root)
    pair = load_experiment(SMOKE_CONFIG, ["task.text_columns=[premise, hypothesis]"], workdir=root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    versions, expected, experiments = {}, {}, {}
    with tracking_at(uri):
        experiment_id = mlflow.MlflowClient().create_experiment("serving",
                                                                artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id):
            for name in STUDENTS:
                exp = pair if name.endswith("-pair") else named
                folder = root / name
                build_student(name, exp.task.num_labels).save_pretrained(folder)
                tiny_tokenizer.save_pretrained(folder)
                info = register.log_student(folder, exp)
                versions[name] = register.register(info.model_uri, name, {"method": "kd"})
                expected[name], experiments[name] = evaluated(folder, exp), exp
                assert len(set(expected[name][0])) > 1, f"{name} gives every sentence one label"
    return {"uri": uri, "experiment_id": experiment_id, "versions": versions, "expected": expected,
            "experiments": experiments}


@pytest.fixture
def registry(registered_students):
    with tracking_at(registered_students["uri"]):
        yield registered_students


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory, registered_students) -> dict:
    """A working folder and environment in which kd, stages and pipeline cannot be imported."""
    folder = tmp_path_factory.mktemp("elsewhere")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(f"REPO = {str(REPO)!r}\n" + BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(folder / "site"), "MLFLOW_TRACKING_URI": registered_students["uri"],
           # `mlflow models serve` starts uvicorn by name.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return {"cwd": folder, "env": env}


def test_logged_model_has_signature_example_and_no_repository_code(registry):
    client = mlflow.MlflowClient()
    for name, version in registry["versions"].items():
        info = mlflow.models.get_model_info(f"models:/{name}/{version}")
        inputs = [spec.name for spec in info.signature.inputs.inputs]
        assert inputs == ([TEXT, TEXT_PAIR] if name.endswith("-pair") else [TEXT])
        assert [spec.name for spec in info.signature.outputs.inputs] == [LABEL, PROBABILITIES]
        assert info.saved_input_example_info is not None
        assert int(client.get_model_version_by_alias(name, register.CANDIDATE).version) == version
    bilstm = mlflow.artifacts.download_artifacts(f"models:/tiny-bilstm/{registry['versions']['tiny-bilstm']}")
    assert sorted(path.name for path in (Path(bilstm) / "code").iterdir()) == ["bilstm.py"]
    bert = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-bert/{registry['versions']['tiny-bert']}"))
    assert not (bert / "code").exists() and "kd" not in (bert / "requirements.txt").read_text()


def test_a_regression_student_serves_the_scores_the_pipeline_evaluates(registry, tmp_path, tiny_tokenizer):
    exp = load_experiment(SMOKE_CONFIG, ["task.task_type=regression"], workdir=tmp_path)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    with mlflow.start_run(experiment_id=registry["experiment_id"]):
        info = register.log_student(tmp_path / "student", exp)
    assert [spec.name for spec in info.signature.outputs.inputs] == [SCORE]
    scores = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({TEXT: TEXTS}))[SCORE]
    collator = Collator(load_tokenizer(str(tmp_path / "student")), exp.teacher.max_length, regression=True)
    logits = predict_frame(load_classifier(str(tmp_path / "student"), 1), collator, pd.DataFrame({TEXT_A: TEXTS}))
    np.testing.assert_allclose(scores, logits.reshape(-1), atol=1e-6)


@pytest.mark.slow
def test_registered_models_load_and_predict_without_the_repository(registry, elsewhere):
    request = {"models": {name: [version, frame_of(registry["experiments"][name])]
                          for name, version in registry["versions"].items()},
               "roots": [str(REPO / package) for package in ("kd", "stages", "pipeline")]}
    done = subprocess.run([sys.executable, "-c", LOAD, json.dumps(request)], cwd=elsewhere["cwd"], env=elsewhere["env"],
                          capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["repository_modules"] == []
    for name, (labels, probabilities) in registry["expected"].items():
        assert answer["predictions"][name]["label"] == labels, name
        np.testing.assert_allclose(answer["predictions"][name]["probabilities"], probabilities, atol=1e-5)


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with NO_PROXY.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"no answer from {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_labels_of_the_loaded_model(registry, elsewhere):
    name, version = "tiny-bert", registry["versions"]["tiny-bert"]
    port, log = free_port(), elsewhere["cwd"] / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=elsewhere["cwd"], env=elsewhere["env"], stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log, SERVE_TIMEOUT_S)
        body = json.dumps({"dataframe_split": {"columns": [TEXT], "data": [[text] for text in TEXTS]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with NO_PROXY.open(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and the uvicorn it started share its session's group
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(pd.DataFrame({TEXT: TEXTS}))
    assert [row[LABEL] for row in served] == loaded[LABEL].tolist() == registry["expected"][name][0]
    np.testing.assert_allclose([row[PROBABILITIES] for row in served], np.stack(loaded[PROBABILITIES]), atol=1e-6)


# --- pipeline register WORKDIR STUDENT ------------------------------------------------------------------------


PARAMETERS = {"params": 50_000, "embedding_params": 20_000, "word_embedding_params": 19_000,
              "non_embedding_params": 30_000, "vocab_size": 21, "hidden_size": 16}


def summary_entry(spec, dev: float, latency_ms: float, workdir: Path) -> StudentSummary:
    """A student of summary.json."""
    return StudentSummary(
        method=spec.method, family="transformer", baseline=spec.method_object().is_baseline(),
        layers=spec.student.layers, init={"from": spec.student.init_from, "layers": "uniform"},
        selected_epoch=1, hidden_size=None, soft_labels=spec.soft_labels,
        dev={"accuracy": dev, "f1": dev, "mcc": 0.2}, test={"accuracy": dev - 0.05, "f1": dev, "mcc": 0.2},
        params=50_000, size_bytes=200_000, latency_ms=latency_ms, throughput=8000 / latency_ms, parameters=PARAMETERS,
        compression=2.0, compression_embeddings=1.0, compression_non_embedding=3.0, speedup=10.0 / latency_ms,
        teacher_signals="cached", epochs=1, epoch_seconds=3.0, train_rows=160,
        evaluate_dir=workdir / "artifacts" / "evaluate" / spec.name)


def record_run(exp, store: ArtifactStore, tokenizer):
    """The MLflow records of the run, as the runner logs them, and its distill artifacts."""
    tracker = Tracker(exp.tracking_uri, exp.experiment_name, exp.artifact_root)
    with tracker.pipeline_run(exp.name, exp.model_dump(mode="json")) as run:
        remember_run(exp.workdir, tracker.tracking_uri, run.info.run_id)
        for offset in (0, 1):
            for spec in exp.students:
                spec = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": spec.train.seed + offset})})
                key = content_key("distill", spec)
                with store.writing("distill", key) as scratch:
                    torch.manual_seed(offset)
                    BertForSequenceClassification(tiny_bert_config()).save_pretrained(scratch / STUDENT_DIR)
                    tokenizer.save_pretrained(scratch / STUDENT_DIR)
                tracker.log_stage(f"distill {spec.name} ({spec.method})" + (f" seed+{offset}" if offset else ""),
                                  params=spec.model_dump(mode="json"), result={},
                                  tags={"stage": "distill", "key": key, "cached": "false", "method": spec.method})
    return run


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory, tiny_tokenizer):
    """A workdir as `pipeline run --seeds 2` leaves it: the run's MLflow records (the experiment as params, a nested
    distill run per student and seed tagged with its artifact's key), the distill artifacts and summary.json."""
    workdir = tmp_path_factory.mktemp("finished")
    exp = load_experiment(SMOKE_CONFIG, workdir=workdir)
    store = ArtifactStore(workdir / "artifacts")
    with tracking_at(exp.tracking_uri):
        run = record_run(exp, store, tiny_tokenizer)
    first, second = exp.students
    teacher = TeacherSummary(source=exp.teacher.source, fine_tuned=True, dev={"accuracy": 0.9},
                             test={"accuracy": 0.88}, params=100_000, size_bytes=400_000, latency_ms=10.0,
                             throughput=800.0,
                             parameters={**PARAMETERS, "params": 100_000, "non_embedding_params": 80_000})
    summary = Summary(experiment=exp.name, metric="accuracy", data_dir=workdir / "artifacts" / "data" / "x",
                      teacher=teacher, students={first.name: summary_entry(first, 0.80, 5.0, workdir),
                                                 second.name: summary_entry(second, 0.70, 2.0, workdir)})
    write_summaries(workdir, [summary])
    return exp, run.info.run_id


@pytest.fixture
def finished_run(finished_workdir):
    exp, _ = finished_workdir
    with tracking_at(exp.tracking_uri):
        yield finished_workdir


def invoke(*args: str):
    return CliRunner().invoke(app, ["register", *map(str, args)])


def registered(name: str):
    return mlflow.MlflowClient().get_model_version_by_alias(name, register.CANDIDATE)


def test_register_a_named_student_of_a_finished_run(finished_run):
    exp, run_id = finished_run
    spec = exp.students[0]
    result = invoke(exp.workdir, spec.name)
    assert result.exit_code == 0, result.output
    assert f"registered {exp.name}-{spec.method} version" in result.output
    version = registered(f"{exp.name}-{spec.method}")
    assert version.run_id == run_id
    assert {key: version.tags[key] for key in ("method", "student", "teacher", "dev_accuracy", "test_accuracy",
                                                "speedup")} == {
        "method": spec.method, "student": spec.name, "teacher": exp.teacher.source, "dev_accuracy": "0.8",
        "test_accuracy": str(0.80 - 0.05), "speedup": "2.0"}
    # --seeds 2 distilled it twice; summary.json describes the first seed's model.
    assert json.loads(version.tags["config"])["train.seed"] == str(spec.train.seed)
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    model = mlflow.pyfunc.load_model(f"models:/{exp.name}-{spec.method}@{register.CANDIDATE}")
    assert set(model.predict(pd.DataFrame({TEXT: TEXTS}))[LABEL]) <= set(exp.task.labels)


def test_register_best_student_within_a_latency_budget(finished_run):
    exp, _ = finished_run
    first, second = exp.students
    result = invoke(exp.workdir, "best")
    assert result.exit_code == 0 and f"{first.name} → registered" in result.output, result.output
    result = invoke(exp.workdir, "best", "--max-latency-ms", "3")
    assert result.exit_code == 0 and f"{second.name} → registered" in result.output, result.output
    assert registered(f"{exp.name}-{second.method}").tags["student"] == second.name


@pytest.mark.parametrize("args, message", [
    (["nope"], "no student 'nope' in the run; its students: kd_2L, finetune_2L (or best)"),
    (["best", "--max-latency-ms", "1"], "no student within 1 ms; the fastest, finetune_2L, takes 2.0 ms"),
    (["kd_2L", "--max-latency-ms", "3"], "no student 'kd_2L' within 3 ms"),
])
def test_register_refuses_an_unknown_or_too_slow_student_in_one_line(finished_run, args, message):
    exp, _ = finished_run
    result = invoke(exp.workdir, *args)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_register_refuses_a_workdir_without_a_finished_run(finished_run, tmp_path):
    exp, _ = finished_run
    result = invoke(tmp_path, "best")
    assert result.exit_code == 1 and f"records no pipeline run ({RUN_FILE})" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    client = mlflow.MlflowClient()
    running = client.create_run(client.get_experiment_by_name(exp.experiment_name).experiment_id)
    remember_run(tmp_path, exp.tracking_uri, running.info.run_id)
    result = invoke(tmp_path, "best")
    assert result.exit_code == 1 and "is running, not finished" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_register_the_best_student_of_a_real_run(smoke_pipeline):
    """The records `pipeline run` leaves are the ones `register` reads."""
    exp, _, _ = smoke_pipeline
    # Other tests run the smoke workdir again with students of their own: register reads the last run.
    students = load_summaries(exp.workdir)[0].students
    with tracking_at(exp.tracking_uri):
        result = invoke(exp.workdir, "best")
        assert result.exit_code == 0, result.output
        student = next(name for name in students if f"{name} → registered" in result.output)
        assert student == max(students, key=lambda name: (students[name].dev["accuracy"], -students[name].latency_ms))
        version = registered(f"{exp.name}-{students[student].method}")
        assert version.tags["student"] == student and float(version.tags["speedup"]) > 0
        model = mlflow.pyfunc.load_model(f"models:/{exp.name}-{students[student].method}/{version.version}")
        assert set(model.predict(pd.DataFrame({TEXT: TEXTS}))[LABEL]) <= set(exp.task.labels)
