"""The local Ray the pipeline starts: its workers compete for the cores on equal terms with Ray's own daemons."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_workers_run_at_normal_priority(ray_session):
    @ray_session.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_session.get(niceness.remote()) == 0


def test_without_verbose_ray_data_keeps_its_info_lines_off_the_terminal():
    import logging

    from pipeline.ray_session import quiet_console

    quiet_console()
    quiet_console()  # idempotent: one filter per handler
    handlers = logging.getLogger("ray.data").handlers
    consoles = [handler for handler in handlers if isinstance(handler, logging.StreamHandler)]
    files = [handler for handler in handlers if not isinstance(handler, logging.StreamHandler)]
    assert consoles and files and all(len(handler.filters) <= 2 for handler in consoles)

    def record(level: int, message: str, name: str = "ray.data._internal.execution.streaming_executor"):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    plan = record(logging.INFO, "Execution plan of Dataset dataset_1: InputDataBuffer[Input] -> TaskPoolMapOperator")
    no_cpu = record(logging.WARNING, "Warning: The Ray cluster currently does not have any available CPUs.")
    unreadable = record(logging.WARNING, "a block could not be read")
    for console in consoles:  # the terminal: warnings only, less the one the scheduler causes
        assert not console.filter(plan) and not console.filter(no_cpu) and console.filter(unreadable)
    for file in files:  # the log file keeps everything
        assert file.filter(plan) and file.filter(no_cpu)

    sigterm = record(logging.WARNING, "SIGTERM handler is not set because current thread is not the main thread.",
                     "ray._private.worker")
    token = record(logging.WARNING, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled "
                   "to opt out.", "ray._private.authentication.authentication_token_setup")
    lost_node = record(logging.WARNING, "The node with node id abc has been marked dead", "ray._private.worker")
    ray_consoles = [handler for handler in logging.getLogger("ray").handlers
                    if isinstance(handler, logging.StreamHandler)]
    assert ray_consoles
    for console in ray_consoles:
        assert not console.filter(sigterm) and not console.filter(token) and console.filter(lost_node)

    # One handler on both loggers (pytest's log-file handler ended up so in a full run) drops both loggers' notices.
    shared = logging.StreamHandler()
    for name in ("ray.data", "ray"):
        logging.getLogger(name).addHandler(shared)
    try:
        quiet_console()
        assert len(shared.filters) == 1
        assert not shared.filter(no_cpu) and not shared.filter(sigterm) and shared.filter(lost_node)
    finally:
        for name in ("ray.data", "ray"):
            logging.getLogger(name).removeHandler(shared)


def test_without_verbose_transformers_saves_and_loads_without_a_word(tmp_path, capfd):
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.ray_session import quiet_console

    quiet_console()
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""


LOCAL_RAY_OUTLIVES_ITS_STARTER = """
import threading
import ray
from pipeline.config import RayConfig
from pipeline.ray_session import ensure_ray

starter = threading.Thread(target=ensure_ray, args=(RayConfig(address="local", num_cpus=1),))
starter.start()
starter.join()  # as the runner's stage threads end once every stage is done

@ray.remote(num_cpus=0)
def answer():
    return 42

print("answer", ray.get(answer.remote(), timeout=60))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_ray_started_by_a_thread_outlives_that_thread():
    """The run's summary times its models after the stage threads that started Ray have ended; a local Ray's
    daemons die with the thread that started them unless that thread lasts."""
    done = subprocess.run([sys.executable, "-c", LOCAL_RAY_OUTLIVES_ITS_STARTER], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=240)
    assert "answer 42" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
