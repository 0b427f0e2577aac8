"""Label-stage throughput: the Ray Data stage (``stages.label``) against a bare PyTorch loop in one process.

Both run the stage's own ``TeacherPredictor`` (same teacher, batch size, torch threads and rows), so the ratio
is what Ray costs on top of the same compute. The bare loop runs first, before Ray starts, so Ray's idle
daemons do not slow it. Inside the Ray run the predictor is swapped for a subclass that logs when its
constructor (model load) and each ``__call__`` start and end; subtracting those from the stage's wall time
says where the rest goes, and Ray Data's own per-operator stats split the map operator's time into batch
formatting, the function body and output-block building.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import (console, label_in_process, machine_info, machine_line, print_table, rt_rows,
                                write_results)

NAME = "bench_label"
NUM_LABELS = 2  # rt-snippets is binary sentiment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000],
                        help="Dataset sizes; rt-snippets sentences, repeated past 10,568 (default: 10000 100000).")
    parser.add_argument("--batch-size", type=int, default=128, help="label.batch_size (default: the quickstart's 128).")
    parser.add_argument("--max-length", type=int, default=64, help="teacher.max_length in tokens (default: 64).")
    parser.add_argument("--actors", type=int, default=1, help="label.actors (default: 1).")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="label.cpus_per_actor (default: 1).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="Torch threads per actor and in the bare loop (default: all cores, as the quickstart).")
    parser.add_argument("--teacher", default=PACKAGED_TEACHER, help="teacher.source (default: the packaged MiniLM).")
    parser.add_argument("--seed", type=int, default=0, help="Order in which rt-snippets sentences are drawn.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 256 rows, batch 64.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.batch_size = [256], 64
    return args


def timed_predictor(log_path: str) -> type:
    """The stage's ``TeacherPredictor``, appending to ``log_path`` the wall-clock span of its constructor and
    of each call. Built inside a function so that Ray pickles the class by value: the actor never has to import
    this script."""
    from kd.batching import TEACHER_LOGITS
    from stages.label import TeacherPredictor

    class TimedTeacherPredictor(TeacherPredictor):
        def __init__(self, *args, **kwargs):
            start = time.time()
            super().__init__(*args, **kwargs)
            self._log({"event": "init", "start": start, "end": time.time()})

        def __call__(self, rows):
            start = time.time()
            rows = super().__call__(rows)
            self._log({"event": "call", "start": start, "end": time.time(), "rows": len(rows[TEACHER_LOGITS])})
            return rows

        @staticmethod
        def _log(record: dict) -> None:
            with open(log_path, "a") as log:
                log.write(json.dumps({**record, "pid": os.getpid()}) + "\n")

    return TimedTeacherPredictor


def bare_loop(train_path: Path, out_path: Path, model_dir: str, args: argparse.Namespace) -> dict:
    """Read, predict and write the same Parquet in this process: the floor the Ray stage is measured against."""
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_parquet(train_path)
    read = time.perf_counter()
    labelled, seconds = label_in_process(frame, model_dir, NUM_LABELS, args.max_length, args.threads, args.batch_size)
    predicted = time.perf_counter()
    labelled.to_parquet(out_path)
    total = time.perf_counter() - started
    rows = len(labelled)
    return {"read_s": read - started, "model_load_s": seconds["load_s"], "predict_s": seconds["predict_s"],
            "write_s": total - (predicted - started), "total_s": total, "rows_per_s": rows / total,
            "predict_rows_per_s": rows / seconds["predict_s"]}


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


def ray_stage(train_path: Path, out_dir: Path, rows: int, model_dir: str, cfg, log_path: Path) -> dict:
    """The label stage's body (``stages.label.run`` minus its artifact plumbing) with the timed predictor."""
    import ray

    from stages import label

    started = time.time()
    with mock.patch.object(label, "TeacherPredictor", timed_predictor(str(log_path))):
        labelled = label.label_dataset(label.read_rows(train_path, rows, cfg), model_dir, cfg)
        labelled.write_parquet(str(out_dir))
    written = time.time()
    counted = ray.data.read_parquet(str(out_dir)).count()
    finished = time.time()
    if counted != rows:
        raise RuntimeError(f"the label stage wrote {counted} rows, expected {rows}")

    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    inits = [event for event in events if event["event"] == "init"]
    calls = [event for event in events if event["event"] == "call"]
    actors = len(inits)
    to_actor = min(event["start"] for event in inits) - started
    model_load = sum(event["end"] - event["start"] for event in inits) / actors
    ready = max(event["end"] for event in inits) - started
    in_call = sum(event["end"] - event["start"] for event in calls) / actors
    stage = written - started
    return {
        "stage_s": stage, "count_s": finished - written, "total_s": finished - started,
        "rows_per_s": rows / (finished - started), "actors": actors, "batches": len(calls),
        "to_actor_start_s": to_actor, "model_load_s": model_load, "in_call_s": in_call,
        # With one actor the stage is: start the actor, load the model, then per batch wait for it, call, hand
        # the output on; what is neither start-up nor inside __call__ is Ray's per-batch cost plus the write.
        "outside_call_s": stage - ready - in_call,
        "call_rows_per_s": rows / in_call,
        "operators": operator_times(labelled.get_stats_summary()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from pipeline.config import LabelConfig, RayConfig, TaskConfig, TeacherConfig
    from pipeline.ray_session import ensure_ray
    from stages.models import resolve_model_source

    model_dir = resolve_model_source(args.teacher)
    cfg = SimpleNamespace(
        task=TaskConfig(), teacher=TeacherConfig(source=args.teacher, max_length=args.max_length),
        label=LabelConfig(batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                          threads_per_actor=args.threads),
    )
    results: dict = {"sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench_label_") as scratch:
        scratch = Path(scratch)
        inputs = {}
        for rows in args.rows:
            inputs[rows] = scratch / f"rows{rows}.parquet"
            rt_rows(rows, args.seed).to_parquet(inputs[rows])

        bare = {}
        for rows in args.rows:
            console.print(f"bare loop: {rows} rows")
            bare[rows] = bare_loop(inputs[rows], scratch / f"bare{rows}.parquet", model_dir, args)

        console.print("starting Ray")
        started = time.perf_counter()
        ensure_ray(RayConfig(address="local"))
        results["ray_init_s"] = time.perf_counter() - started
        for rows in args.rows:
            console.print(f"Ray Data label stage: {rows} rows")
            ray_run = ray_stage(inputs[rows], scratch / f"ray{rows}", rows, model_dir, cfg, scratch / f"events{rows}.jsonl")
            results["sizes"].append({
                "rows": rows, "bare": bare[rows], "ray": ray_run,
                "bare_over_ray": bare[rows]["rows_per_s"] / ray_run["rows_per_s"],
                "bare_over_ray_with_init": bare[rows]["rows_per_s"] * (ray_run["total_s"] + results["ray_init_s"]) / rows,
            })

    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    sizes = results["sizes"]
    print_table(
        f"Label stage: Ray Data vs a bare loop (batch {args.batch_size}, {args.threads} torch threads, "
        f"{args.actors} actor(s))",
        ["rows", "bare rows/s", "Ray rows/s", "bare ÷ Ray", "Ray rows/s incl. init", "bare ÷ Ray incl. init"],
        [[s["rows"], f"{s['bare']['rows_per_s']:.0f}", f"{s['ray']['rows_per_s']:.0f}", f"{s['bare_over_ray']:.2f}x",
          f"{s['rows'] / (s['ray']['total_s'] + results['ray_init_s']):.0f}", f"{s['bare_over_ray_with_init']:.2f}x"]
         for s in sizes],
        caption=machine_line(machine),
    )
    rows = [["Ray init (once per process)", "-", f"{results['ray_init_s']:.1f}"]]
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


if __name__ == "__main__":
    main()
