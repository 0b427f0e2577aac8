"""CPU inference latency of the teacher and of students built from it, at batch sizes 1 and 32, with torch
threads pinned to 1 and to all cores.

Students are ``kd.students.build_student`` copies of the teacher's layers (``init: uniform``); their weights
do not change their speed, so no training is needed. Every model is timed by ``kd.evaluation.measure_latency``
(the evaluate stage's harness: fp32, median of the repeats after warm-up) on the same tokenised batches of
rt-snippets sentences. With ``--compile`` every setting is also timed under ``torch.compile``; a compiled row
is shown only when it beats eager, and a compiler that fails is reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import console, machine_info, machine_line, print_table, rt_rows, write_results

NAME = "bench_inference"
NUM_LABELS = 2
TEACHER = "teacher"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="Torch thread counts to pin (default: 1 and all cores).")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 2], help="Student depths (default: 3 2).")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="Timed forward passes; the median is reported.")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile'd models.")
    parser.add_argument("--teacher", default=PACKAGED_TEACHER, help="teacher.source (default: the packaged MiniLM).")
    parser.add_argument("--seed", type=int, default=0, help="Which sentences make up the batches.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 warm-up, 3 repeats, batch sizes 1 and 8.")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.batch_sizes = 1, 3, [1, 8]
    return args


def build_models(args: argparse.Namespace) -> tuple[dict, object]:
    """The teacher and a student of each depth, in eval mode, and the teacher's tokenizer."""
    from kd.students import StudentShape, build_student
    from kd.checkpoints import load_classifier, load_tokenizer
    from stages.models import resolve_model_source

    model_dir = resolve_model_source(args.teacher)
    teacher = load_classifier(model_dir, NUM_LABELS).eval()
    models = {TEACHER: teacher}
    for layers in args.layers:
        models[f"student {layers}L"] = build_student(teacher, StudentShape(layers=layers, init="uniform")).eval()
    return models, load_tokenizer(model_dir)


def try_compile(model, batch: dict, threads: int, args: argparse.Namespace) -> dict:
    """Latency of ``torch.compile(model)``, compiled afresh under ``threads`` (inductor bakes the thread count
    into its kernels), or the error that stopped it."""
    import torch

    from kd.evaluation import measure_latency

    torch._dynamo.reset()
    try:
        return measure_latency(torch.compile(model), batch, warmup=args.warmup, repeats=args.repeats, threads=threads)
    except Exception as error:  # inductor fails in many ways (no compiler, unsupported op); any means "skip"
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from kd.batching import Collator
    from kd.evaluation import measure_latency
    from kd.students import count_parameters

    models, tokenizer = build_models(args)
    collator = Collator(tokenizer, args.max_length)
    # The batches are the first rows of one seeded draw, so batch 1 is batch 32's first sentence.
    sentences = rt_rows(max(args.batch_sizes), args.seed)
    batches = {size: collator.encode({column: sentences[column].to_numpy()[:size] for column in sentences})
               for size in args.batch_sizes}
    results: dict = {"params": {name: count_parameters(model) for name, model in models.items()},
                     "tokens": {size: int(batch["input_ids"].shape[1]) for size, batch in batches.items()},
                     "settings": []}
    compile_error = None
    for threads in args.threads:
        for size in args.batch_sizes:
            timings = {}
            for name, model in models.items():
                console.print(f"{threads} thread(s), batch {size}: {name}")
                timings[name] = measure_latency(model, batches[size], warmup=args.warmup, repeats=args.repeats,
                                                threads=threads)
                if args.compile and compile_error is None:
                    compiled = try_compile(model, batches[size], threads, args)
                    compile_error = compiled.get("error")
                    if compile_error is None:
                        timings[name]["compiled"] = compiled
            teacher_ms = timings[TEACHER]["latency_ms"]
            for timing in timings.values():
                timing["speedup"] = teacher_ms / timing["latency_ms"]
                if "compiled" in timing:
                    timing["compiled"]["speedup"] = teacher_ms / timing["compiled"]["latency_ms"]
                    timing["compiled"]["pays"] = timing["compiled"]["latency_ms"] < timing["latency_ms"]
            results["settings"].append({"threads": threads, "batch_size": size, "models": timings})
    results["compile_error"] = compile_error
    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    rows, tried, paid = [], 0, 0
    for setting in results["settings"]:
        for name, timing in setting["models"].items():
            label = f"{setting['threads']} thr, batch {setting['batch_size']}: {name}"
            rows.append([label, f"{results['params'][name] / 1e6:.1f}M", f"{timing['latency_ms']:.2f}",
                         f"{timing['throughput']:.0f}", f"{timing['speedup']:.2f}x"])
            compiled = timing.get("compiled")
            if compiled is None:
                continue
            tried += 1
            if compiled["pays"]:
                paid += 1
                rows.append([f"{label} (compiled)", "", f"{compiled['latency_ms']:.2f}",
                             f"{compiled['throughput']:.0f}", f"{compiled['speedup']:.2f}x"])
    if not args.compile:
        note = "torch.compile not tried (--compile)."
    elif results["compile_error"]:
        note = f"torch.compile failed and was skipped: {results['compile_error']}"
    else:
        note = f"torch.compile beat eager in {paid} of {tried} settings; only those rows are shown."
    tokens = ", ".join(f"batch {size}: {count}" for size, count in results["tokens"].items())
    print_table(f"CPU latency, fp32, median of {args.repeats} (padded tokens per row: {tokens})",
                ["model", "params", "latency ms", "rows/s", "speedup vs teacher"], rows,
                caption=f"{note}\n{machine_line(machine)}")


if __name__ == "__main__":
    main()
