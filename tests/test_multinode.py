"""A real two-node Ray cluster on this machine: the smoke pipeline submitted with ``ray job submit``, its soft-label
actors and training workers spread over both nodes, tracked by a real ``mlflow server`` over HTTP.

Each node offers one ``labeler`` and two ``trainer`` slots; the experiment asks for two label actors, and two
students of two training workers each, up to two stages at once. A run that finishes has labelled on both nodes,
and its two students, which start together and only fit side by side on two nodes, trained at the same time; the Ray state API says
where each actor ran and the stages' own start and end times show the overlap. Every process is started here and stopped here by PID; the cluster has a temp dir and ports of its
own, so it neither sees nor disturbs another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import yaml
from transformers import BertForSequenceClassification

from conftest import SMOKE_CONFIG, free_port, tiny_bert_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the ray and mlflow commands of this environment
SLOTS = {"labeler": 1, "trainer": 2}
JOB_RUNTIME_ENV = {
    # The working dir Ray uploads: the code, not environments, runs or results (Ray also leaves out .git and
    # what .gitignore names).
    "excludes": [".venv", "runs", "mlruns", "benchmarks/results", "**/__pycache__"],
    # Ray Data starts labelling as soon as one pool actor is up; on a busy machine the first can finish the
    # smoke rows before the second is placed. Waiting for the whole pool makes the placement deterministic.
    "env_vars": {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"},
}


def node_env() -> dict[str, str]:
    """The nodes' environment, which the job's entrypoint inherits: without PYTHONPATH, so the job imports
    the uploaded working dir and not a checkout this process happens to see."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    # Token auth is on by default once ~/.ray/auth_token exists, whichever process made it; this cluster, on one
    # machine and torn down at the end, runs without, the same on every machine. SIGTERM would otherwise wait
    # up to 30 s for a node to drain.
    env.update(RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_worker_niceness="0")  # as cluster.yaml starts its nodes
    return env


@contextmanager
def started(command: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A foreground process, stopped by PID on exit: SIGTERM, then SIGKILL if it lingers."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(ready, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")


def get_json(url: str) -> dict | None:
    """The JSON a server answers with, or None while it does not answer (still starting)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def state(dashboard: str, resource: str) -> list[dict]:
    """Ray's state API (nodes, actors) over the dashboard's HTTP endpoint, which `ray list` also reads."""
    answer = get_json(f"{dashboard}/api/v0/{resource}?detail=1&limit=10000")
    return answer["data"]["result"]["result"] if answer and answer.get("result") else []


def alive_nodes(dashboard: str) -> set[str]:
    return {node["node_id"] for node in state(dashboard, "nodes") if node["state"] == "ALIVE"}


def processes_under(temp_dir: Path) -> list[psutil.Process]:
    """Processes of this cluster: every Ray daemon and worker names its session under the cluster's temp dir."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
            mine.append(proc)
    return mine


def start_node(stack: ExitStack, command: list[str], log: Path, env: dict[str, str], ready, attempts: int = 3) -> None:
    """`ray start` gives a raylet a fixed 30 s to register with the GCS, which a loaded machine can miss: that
    start fails with "timed out during startup" and is tried again."""
    for attempt in range(1, attempts + 1):
        proc = stack.enter_context(started(command, log, env))
        try:
            wait_until(ready, f"the Ray node ({log.name})", proc, log)
            return
        except RuntimeError as error:
            if attempt == attempts or "timed out during startup" not in str(error):
                raise


@contextmanager
def two_node_cluster(temp_dir: Path, logs: Path) -> Iterator[str]:
    """A head and a second node as `ray start --block` processes; yields the dashboard (job server) address."""
    port, dashboard_port = free_port(), free_port()
    common = ["--block", "--temp-dir", str(temp_dir), "--num-cpus", "4",
              "--resources", json.dumps(SLOTS), "--object-store-memory", str(200 * 2**20),
              "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), *common]
    second = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}",
              "--dashboard-agent-listen-port", str(free_port()), *common]
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env = node_env()
    try:
        with ExitStack() as stack:
            for command, name, nodes in ((head, "head", 1), (second, "second", 2)):
                start_node(stack, command, logs / f"ray-{name}.log", env, lambda n=nodes: len(alive_nodes(dashboard)) == n)
            yield dashboard
    finally:
        # `ray start --block` stops its node's daemons on SIGTERM; workers follow their raylet. Anything of this
        # cluster still alive after that is stopped by its PID.
        deadline = time.monotonic() + 15
        while processes_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in processes_under(temp_dir):
            proc.kill()


@contextmanager
def mlflow_server(root: Path, logs: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """The server's URI and a wait for it to answer: it starts while the Ray nodes do."""
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]
    with started(command, logs / "mlflow.log", node_env()) as proc:
        uri = f"http://127.0.0.1:{port}"
        yield uri, lambda: wait_until(
            lambda: get_json(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"),
            "the MLflow server", proc, logs / "mlflow.log")


def tiny_teacher_dir(path: Path, tokenizer) -> Path:
    """A tiny random BERT with a classifier head, so no teacher fine-tuning run is needed."""
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cluster_experiment(path: Path, teacher: Path, workdir: Path, tracking_uri: str) -> Path:
    """Two kd students with two training workers each, two label actors, one slot each, and two stages at once.

    Both students read the soft labels, so both are ready at the same moment and start together. (With the smoke
    profile's finetune student, which needs only the teacher, a loaded machine finished it before the labels
    were done, and the kd student then had the whole of one node to itself.)"""
    document = yaml.safe_load(SMOKE_CONFIG.read_text())
    document.update(name=f"multinode-{uuid.uuid4().hex[:6]}", workdir=str(workdir))
    kd_student = next(student for student in document["students"] if student["method"] == "kd")
    document["students"] = [kd_student, {**kd_student, "name": "kd_2L_t2", "params": {"temperature": 2.0}}]
    document["teacher"]["source"] = str(teacher)
    document["label"].update(actors=2, resources={"labeler": 1})
    document["ray"].update(num_workers=2, resources_per_worker={"trainer": 1}, torch_threads=1,
                           max_concurrent_stages=2)
    document["mlflow"] = {"tracking_uri": tracking_uri}
    path.write_text(yaml.safe_dump(document))
    return path


def actor_nodes(dashboard: str, is_kind) -> set[str]:
    return {actor["node_id"] for actor in state(dashboard, "actors") if is_kind(actor["class_name"])}


def test_submitted_pipeline_spreads_over_two_nodes(tmp_path, tiny_tokenizer):
    from mlflow.tracking import MlflowClient

    # Unix socket paths under the temp dir must stay short (108 bytes), so not under pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="kdray-", dir="/tmp"))
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        with mlflow_server(tmp_path / "mlflow", logs) as (tracking_uri, wait_for_mlflow), \
                two_node_cluster(temp_dir, logs) as dashboard:
            wait_for_mlflow()
            teacher = tiny_teacher_dir(tmp_path / "teacher", tiny_tokenizer)
            config = cluster_experiment(tmp_path / "experiment.yaml", teacher, tmp_path / "work", tracking_uri)
            job_id = f"kd-multinode-{uuid.uuid4().hex[:8]}"
            entrypoint = (f"{sys.executable} -c 'import pipeline; print(\"code from\", pipeline.__file__)' && "
                          f"{sys.executable} -m pipeline run {config} --set ray.address=auto")
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job_id,
                 "--working-dir", str(REPO), "--runtime-env-json", json.dumps(JOB_RUNTIME_ENV),
                 "--", "sh", "-c", entrypoint],
                env=node_env(), capture_output=True, text=True, timeout=480)
            (logs / "job-submit.log").write_text(submit.stdout + submit.stderr)

            job = get_json(f"{dashboard}/api/jobs/{job_id}")
            output = get_json(f"{dashboard}/api/jobs/{job_id}/logs")["logs"]
            assert job["status"] == "SUCCEEDED", output[-4000:] + submit.stderr[-2000:]
            code_from = output.split("code from ", 1)[1].splitlines()[0]
            assert "runtime_resources" in code_from and str(REPO) not in code_from, \
                f"the job must import the uploaded working dir, not {code_from}"
            nodes = alive_nodes(dashboard)
            labellers = actor_nodes(dashboard, lambda name: name.startswith("MapWorker(") and "TeacherPredictor" in name)
            trainers = actor_nodes(dashboard, lambda name: name == "RayTrainWorker")
            assert len(nodes) == 2 and labellers == nodes, f"label actors ran on {labellers}, nodes are {nodes}"
            assert trainers == nodes, f"training workers ran on {trainers}, nodes are {nodes}"

            client = MlflowClient(tracking_uri)
            experiment = client.get_experiment_by_name(yaml.safe_load(config.read_text())["name"])
            runs = client.search_runs([experiment.experiment_id])
            by_name = {run.info.run_name: run for run in runs}
            assert {"soft labels", "distill kd_2L (kd)", "evaluate kd_2L"} <= set(by_name), sorted(by_name)
            assert all(run.info.status == "FINISHED" for run in runs)
            distilled = by_name["distill kd_2L (kd)"].info.run_id
            assert client.list_artifacts(distilled, "student"), "the student must be uploaded to the server"
            spans = [(by_name[stage].data.metrics["started_at"], by_name[stage].data.metrics["finished_at"])
                     for stage in ("distill kd_2L (kd)", "distill kd_2L_t2 (kd)")]
            (start_a, end_a), (start_b, end_b) = spans
            assert start_a < end_b and start_b < end_a, f"the two students trained one after the other: {spans}"
            assert any((tmp_path / "mlflow" / "artifacts").rglob("model.safetensors"))
        assert not processes_under(temp_dir), "every process of the test cluster must be stopped"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
