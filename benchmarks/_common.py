"""What the benchmarks share: machine facts, rt-snippets rows, the teacher's logits, and writing the figures
as a rich table on the terminal and a JSON file under ``benchmarks/results/``."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

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
