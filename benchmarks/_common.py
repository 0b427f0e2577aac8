"""What the benchmarks share: machine facts, rt-snippets rows, the teacher's logits, the label stage timed
against a bare loop, peak memory of a process tree, and writing the figures as a rich table on the terminal and
a JSON file under ``benchmarks/results/``."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from kd.batching import LABEL, TEACHER_LOGITS, TEXT_A, iterate_frame

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# CPU features that decide how fast a bf16 or fp32 transformer runs; the rest of /proc/cpuinfo's flags is noise.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAY_TRAIN_V2_ENABLED")

console = Console(width=None if sys.stdout.isatty() else 160)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """Facts that decide whether two result files are comparable. Call it before anything sets torch's threads,
    so ``torch_threads`` is the process default."""
    import ray
    import torch
    import transformers

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {name: os.environ[name] for name in THREAD_ENV if name in os.environ},
        # A busy machine makes every figure here slower; the load at the start says whether it was quiet.
        "load_average_1m_5m_15m": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "git": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
    }


def rt_rows(n: int, seed: int = 0, offset: int = 0) -> pd.DataFrame:
    """Rows ``offset .. offset+n`` (``text_a``, ``label``) of rt-snippets in a seeded order, the corpus repeated
    as often as ``n`` needs: every size keeps the corpus's sentence lengths, and two calls with disjoint ranges
    inside one pass of the corpus share no sentence."""
    from stages.data import load_rt_snippets

    corpus = load_rt_snippets()
    order = np.random.default_rng(seed).permutation(len(corpus))
    index = np.tile(order, -(-(offset + n) // len(corpus)))[offset:offset + n]
    return pd.DataFrame({TEXT_A: corpus["sentence"].to_numpy()[index], LABEL: corpus["label"].to_numpy()[index]})


def label_in_process(frame: pd.DataFrame, model_dir: str, num_labels: int, max_length: int, threads: int,
                     batch_size: int, seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """The label stage's own ``TeacherPredictor`` run in this process over ``frame`` in batches of
    ``batch_size``: the frame with ``teacher_logits`` added, and the seconds spent loading and predicting.
    Sets this process's torch threads to ``threads``, as the stage's actor does."""
    import torch

    from stages.label import TeacherPredictor

    # A teacher with no classifier for the task (the packaged MiniLM) gets a random head when loaded. Seeding
    # as train_student does before it loads the teacher gives these logits the head a training job will see.
    torch.manual_seed(seed)
    started = time.perf_counter()
    predictor = TeacherPredictor(model_dir, num_labels, max_length, threads)
    loaded = time.perf_counter()
    logits = [predictor(rows)[TEACHER_LOGITS] for rows in iterate_frame(frame, batch_size)]
    predicted = time.perf_counter()
    labelled = frame.copy()
    labelled[TEACHER_LOGITS] = list(np.concatenate(logits))
    return labelled, {"load_s": loaded - started, "predict_s": predicted - loaded}


def add_label_arguments(parser) -> None:
    """The label stage's settings as flags, at the quickstart's values."""
    parser.add_argument("--batch-size", type=int, default=128, help="label.batch_size (default: the quickstart's 128).")
    parser.add_argument("--max-length", type=int, default=64, help="teacher.max_length in tokens (default: 64).")
    parser.add_argument("--actors", type=int, default=1, help="label.actors (default: 1).")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="label.cpus_per_actor (default: 1).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="Torch threads per actor and in the bare loop (default: all cores, as the quickstart).")


def label_config(teacher: str, max_length: int, batch_size: int, actors: int, cpus_per_actor: float,
                 threads: int):
    """The label stage's own config slice (``stages.label.Config``), as the runner builds it."""
    from stages.config import LabelConfig, TaskConfig, TeacherConfig
    from stages.label import Config

    return Config(task=TaskConfig(), teacher=TeacherConfig(source=teacher, max_length=max_length),
                  label=LabelConfig(batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor,
                                    threads_per_actor=threads))


def bare_label(in_path: Path, out_path: Path, model_dir: str, cfg) -> dict:
    """Read, predict and write the same Parquet in this process: the floor the Ray stage is measured against."""
    started = time.perf_counter()
    frame = pd.read_parquet(in_path)
    read = time.perf_counter()
    labelled, seconds = label_in_process(frame, model_dir, cfg.task.num_labels, cfg.teacher.max_length,
                                         cfg.label.threads_per_actor, cfg.label.batch_size)
    predicted = time.perf_counter()
    labelled.to_parquet(out_path)
    total = time.perf_counter() - started
    rows = len(labelled)
    return {"read_s": read - started, "model_load_s": seconds["load_s"], "predict_s": seconds["predict_s"],
            "write_s": total - (predicted - started), "total_s": total, "rows_per_s": rows / total,
            "predict_rows_per_s": rows / seconds["predict_s"]}


def timed_actor(actor_class: type, log_path: str) -> type:
    """``actor_class`` (a Ray Data callable class), appending to ``log_path`` the wall-clock span of its
    constructor and of each call, with the rows in and out. Built inside a function so that Ray pickles the
    subclass by value: the actor never has to import the benchmarks package."""

    class Timed(actor_class):
        def __init__(self, *args, **kwargs):
            start = time.time()
            super().__init__(*args, **kwargs)
            self._log({"event": "init", "start": start, "end": time.time()})

        def __call__(self, rows):
            start, rows_in = time.time(), len(rows[LABEL])
            rows = super().__call__(rows)
            self._log({"event": "call", "start": start, "end": time.time(), "rows_in": rows_in,
                       "rows_out": len(rows[LABEL])})
            return rows

        @staticmethod
        def _log(record: dict) -> None:
            with open(log_path, "a") as log:
                log.write(json.dumps({**record, "pid": os.getpid()}) + "\n")

    Timed.__name__ = Timed.__qualname__ = f"Timed{actor_class.__name__}"
    return Timed


def actor_spans(log_path: Path, started: float) -> dict:
    """What a ``timed_actor`` log says about a stage that started at ``started`` (``time.time()``): when the
    first actor's constructor began, the mean constructor time, when the last actor was ready, the seconds inside
    ``__call__`` per actor (exact with one actor, a mean with more), and the calls and rows in and out."""
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    inits = [event for event in events if event["event"] == "init"]
    calls = [event for event in events if event["event"] == "call"]
    actors = len(inits)
    return {
        "actors": actors, "batches": len(calls),
        "to_actor_start_s": min(event["start"] for event in inits) - started,
        "actor_init_s": sum(event["end"] - event["start"] for event in inits) / actors,
        "ready_s": max(event["end"] for event in inits) - started,
        "in_call_s": sum(event["end"] - event["start"] for event in calls) / actors,
        "rows_in": sum(event["rows_in"] for event in calls), "rows_out": sum(event["rows_out"] for event in calls),
    }


def operator_times(summary) -> list[dict]:
    """Ray Data's per-operator seconds, summed over tasks, in execution order: the operators of the datasets
    this one came from, then its own. Operators that ran no task of their own (a read fused into another) have
    no times and are left out."""
    operators = [op for parent in summary.parents for op in operator_times(parent)]
    for op in summary.operators_stats:
        if op.wall_time is None:
            continue
        fields = {"wall_s": op.wall_time, "cpu_s": op.cpu_time, "input_prep_s": op.input_prep_time,
                  "function_body_s": op.function_body_time, "output_build_s": op.output_build_time}
        operators.append({"operator": op.operator_name,
                          **{key: round(value.sum, 4) for key, value in fields.items() if value is not None}})
    return operators


def ray_label(in_path: Path, out_dir: Path, rows: int, model_dir: str, cfg, log_path: Path) -> dict:
    """The label stage's body (``stages.label.run`` minus its artifact plumbing) with the timed predictor."""
    import ray

    from stages import label

    started = time.time()
    with mock.patch.object(label, "TeacherPredictor", timed_actor(label.TeacherPredictor, str(log_path))):
        labelled = label.label_dataset(label.read_rows(in_path, rows, cfg), model_dir, cfg)
        labelled.write_parquet(str(out_dir))
    written = time.time()
    counted = ray.data.read_parquet(str(out_dir)).count()
    finished = time.time()
    if counted != rows:
        raise RuntimeError(f"the label stage wrote {counted} rows, expected {rows}")

    spans = actor_spans(log_path, started)
    stage = written - started
    return {
        "stage_s": stage, "count_s": finished - written, "total_s": finished - started,
        "rows_per_s": rows / (finished - started), "actors": spans["actors"], "batches": spans["batches"],
        "to_actor_start_s": spans["to_actor_start_s"], "model_load_s": spans["actor_init_s"],
        "in_call_s": spans["in_call_s"],
        # With one actor the stage is: start the actor, load the model, then per batch wait for it, call, hand
        # the output on; what is neither start-up nor inside __call__ is Ray's per-batch cost plus the write.
        "outside_call_s": stage - spans["ready_s"] - spans["in_call_s"],
        "call_rows_per_s": rows / spans["in_call_s"],
        "operators": operator_times(labelled.get_stats_summary()),
    }


def label_comparison(rows: int, bare: dict, ray_run: dict, ray_init_s: float) -> dict:
    """One size's bare and Ray figures and their ratios, without and with ``ray.init`` charged to Ray."""
    return {"rows": rows, "bare": bare, "ray": ray_run, "bare_over_ray": bare["rows_per_s"] / ray_run["rows_per_s"],
            "bare_over_ray_with_init": bare["rows_per_s"] * (ray_run["total_s"] + ray_init_s) / rows}


def print_label_tables(sizes: list[dict], ray_init_s: float, title: str, caption: str) -> None:
    """The label comparison (one row per size of ``label_comparison``), where its time goes, and Ray Data's
    per-operator seconds."""
    print_table(
        title,
        ["rows", "bare rows/s", "Ray rows/s", "bare ÷ Ray", "Ray rows/s incl. init", "bare ÷ Ray incl. init"],
        [[s["rows"], f"{s['bare']['rows_per_s']:.0f}", f"{s['ray']['rows_per_s']:.0f}", f"{s['bare_over_ray']:.2f}x",
          f"{s['rows'] / (s['ray']['total_s'] + ray_init_s):.0f}", f"{s['bare_over_ray_with_init']:.2f}x"]
         for s in sizes],
        caption=caption,
    )
    rows = [["Ray init (once per process)", "-", f"{ray_init_s:.1f}"]]
    for s in sizes:
        bare, ray_run = s["bare"], s["ray"]
        n = s["rows"]
        rows += [
            [f"{n} rows: start-up to actor constructor", "-", f"{ray_run['to_actor_start_s']:.1f}"],
            [f"{n} rows: model load", f"{bare['model_load_s']:.1f}", f"{ray_run['model_load_s']:.1f}"],
            [f"{n} rows: predict (inside __call__)", f"{bare['predict_s']:.1f}", f"{ray_run['in_call_s']:.1f}"],
            [f"{n} rows: outside __call__ (read, batching, transfer, write)",
             f"{bare['read_s'] + bare['write_s']:.1f}", f"{ray_run['outside_call_s']:.1f}"],
            [f"{n} rows: final row count", "-", f"{ray_run['count_s']:.1f}"],
            [f"{n} rows: total", f"{bare['total_s']:.1f}", f"{ray_run['total_s']:.1f}"],
            [f"{n} rows: rows/s inside predict", f"{bare['predict_rows_per_s']:.0f}", f"{ray_run['call_rows_per_s']:.0f}"],
        ]
    print_table("Where the time goes (seconds)", ["component", "bare", "Ray"], rows)
    op_rows = [[f"{s['rows']} rows: {op['operator']}", *(f"{op.get(key, float('nan')):.2f}" for key in
                ("wall_s", "input_prep_s", "function_body_s", "output_build_s"))]
               for s in sizes for op in s["ray"]["operators"]]
    print_table("Ray Data operators (seconds summed over tasks)",
                ["operator", "wall", "batch formatting", "function body", "output blocks"], op_rows)


def mib(value: int) -> float:
    return round(value / 2**20, 1)


class PeakMemory:
    """Peak resident memory, sampled every ``interval`` seconds in a thread while the ``with`` block runs: of
    this process (the driver), and of its whole process tree summed (with a local Ray: the GCS, raylet, object
    store and every worker and actor), as RSS and as PSS. RSS counts a shared page (the object store's shared
    memory, shared libraries) in every process that maps it, so the tree's RSS overstates its footprint; PSS
    splits each shared page among the processes sharing it. Sampling misses peaks shorter than ``interval``."""

    def __init__(self, interval: float = 0.2):
        import ray  # noqa: F401  Ray ships psutil (ray/thirdparty_files) and puts it on sys.path when imported
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.peak = {"driver_rss": 0, "tree_rss": 0, "tree_pss": 0, "tree_processes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        psutil = self._psutil
        driver = psutil.Process()
        rss = pss = processes = 0
        for process in [driver, *driver.children(recursive=True)]:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # exited between listing and reading
            rss += info.rss
            pss += getattr(info, "pss", 0)
            processes += 1
        return {"driver_rss": driver.memory_info().rss, "tree_rss": rss, "tree_pss": pss, "tree_processes": processes}

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, value in self.sample().items():
                self.peak[name] = max(self.peak[name], value)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.before = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        """Peaks and the values just before the block, in MiB, and the number of samples."""
        return {**{f"peak_{name}_mib": mib(value) for name, value in self.peak.items() if name != "tree_processes"},
                **{f"before_{name}_mib": mib(value) for name, value in self.before.items() if name != "tree_processes"},
                "peak_tree_processes": self.peak["tree_processes"], "samples": self.samples,
                "interval_s": self.interval}


def result_path(name: str, quick: bool, suffix: str = ".json") -> Path:
    """``results/<name>.json``; a quick run writes ``<name>.quick.json`` so it never replaces real figures."""
    return RESULTS_DIR / f"{name}{'.quick' if quick else ''}{suffix}"


def write_results(name: str, quick: bool, machine: dict, config: dict, results: Any) -> Path:
    path = result_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "quick": quick, "machine": machine, "config": config, "results": results}
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
    """Columns after the first are right-aligned: they hold the figures. The caption goes below the table at
    full width (a rich caption would wrap at the table's width)."""
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)
    if caption:
        console.print(caption, highlight=False)


def machine_line(machine: dict) -> str:
    return (f"{machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']}, ray {machine['ray']}, "
            f"load {machine['load_average_1m_5m_15m'][0]} at start, {machine['date']}")
