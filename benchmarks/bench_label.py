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
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import (add_label_arguments, bare_label, console, label_comparison, label_config,
                                machine_info, machine_line, print_label_tables, ray_label, rt_rows, write_results)

NAME = "bench_label"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000],
                        help="Dataset sizes; rt-snippets sentences, repeated past 10,568 (default: 10000 100000).")
    add_label_arguments(parser)
    parser.add_argument("--teacher", default=PACKAGED_TEACHER, help="teacher.source (default: the packaged MiniLM).")
    parser.add_argument("--seed", type=int, default=0, help="Order in which rt-snippets sentences are drawn.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 256 rows, batch 64.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.batch_size = [256], 64
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from pipeline.config import RayConfig
    from pipeline.ray_session import ensure_ray
    from stages.models import resolve_model_source

    model_dir = resolve_model_source(args.teacher)
    cfg = label_config(args.teacher, args.max_length, args.batch_size, args.actors, args.cpus_per_actor, args.threads)
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
            bare[rows] = bare_label(inputs[rows], scratch / f"bare{rows}.parquet", model_dir, cfg)

        console.print("starting Ray")
        started = time.perf_counter()
        ensure_ray(RayConfig(address="local"))
        results["ray_init_s"] = time.perf_counter() - started
        for rows in args.rows:
            console.print(f"Ray Data label stage: {rows} rows")
            ray_run = ray_label(inputs[rows], scratch / f"ray{rows}", rows, model_dir, cfg, scratch / f"events{rows}.jsonl")
            results["sizes"].append(label_comparison(rows, bare[rows], ray_run, results["ray_init_s"]))

    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    print_label_tables(results["sizes"], results["ray_init_s"],
                       f"Label stage: Ray Data vs a bare loop (batch {args.batch_size}, {args.threads} torch threads, "
                       f"{args.actors} actor(s))", machine_line(machine))


if __name__ == "__main__":
    main()
