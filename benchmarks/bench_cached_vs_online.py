"""Hinton KD from cached teacher logits against the same KD with the teacher run online in every step.

Both runs train the same student (layers copied from the teacher, ``uniform``) on the same rows, in the same
batches, from the same seed, with ``train_student`` and ``LocalIO`` (no Ray). The cached run is the ``kd``
method reading ``teacher_logits`` from Parquet, as the label stage writes them (computed here beforehand with
the stage's own predictor, and timed as the one-off cost of caching). The online run is ``kd`` registered again
in this script with ``online_signals={"logits"}``: the same loss, but every step also runs the frozen teacher.
Epoch time is the ``epoch_seconds`` that ``train_student`` records: batching, tokenising and training steps,
without dev evaluation or checkpoints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import (console, label_in_process, machine_info, machine_line, print_table, rt_rows,
                                write_results)

NAME = "bench_cached_vs_online"
ONLINE_KD = "kd_online"
NUM_LABELS = 2
LABEL_BATCH = 128  # the quickstart's label.batch_size
PAPER_SECONDS = {"cached": 92.0, "online": 233.0}  # TextSmooth's paper, cached vs online teacher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="Training rows of rt-snippets (default: 2000).")
    parser.add_argument("--dev-rows", type=int, default=256, help="Dev rows, evaluated after each epoch (untimed).")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs per run (default: 1).")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Cached and online runs, alternating; figures are medians (default: 1).")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 2, 1],
                        help="Student layer counts, one cached/online pair each (default: 3 2 1 of the teacher's 6): "
                        "the saving is the teacher's forward, so the ratio grows as the student shrinks.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="train.precision (default: fp32).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Torch threads (default: all cores).")
    parser.add_argument("--teacher", default=PACKAGED_TEACHER,
                        help="teacher.source; a fine-tuned teacher folder gives meaningful losses (the timing is the same).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 96 rows (3 steps), 32 dev rows.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dev_rows, args.epochs, args.repeats = 96, 32, 1, 1
    return args


def online_kd() -> str:
    """Register Hinton KD with the teacher's logits computed in the step (once per process, on first use
    rather than at import) and return its name."""
    from kd.methods import METHODS, register_method
    from kd.methods.hinton import HintonKD

    if ONLINE_KD not in METHODS:
        @register_method
        class OnlineHintonKD(HintonKD):
            name = ONLINE_KD
            cached_signals = frozenset()
            online_signals = frozenset({"logits"})
    return ONLINE_KD


def train_once(method: str, layers: int, train_path: Path, dev_path: Path, model_dir: str,
               args: argparse.Namespace) -> dict:
    from kd.training import TrainSettings
    from kd.worker import LocalIO, train_job, train_student

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             precision=args.precision, seed=args.seed)
    job = train_job(method=method, params={"temperature": args.temperature, "alpha": args.alpha},
                    shape={"layers": layers, "init": "uniform"}, settings=settings, teacher=model_dir,
                    init_model=None, tokenizer=model_dir, max_length=args.max_length, num_labels=NUM_LABELS,
                    regression=False, train_rows=args.rows, train_path=str(train_path), torch_threads=args.threads)
    started = time.perf_counter()
    distiller = train_student(job, LocalIO(train_path, dev_path), verbose=False)
    epochs = [record for record in distiller.progress.history if "epoch_seconds" in record]
    return {"epoch_seconds": [record["epoch_seconds"] for record in epochs],
            "steps_per_epoch": distiller.steps_per_epoch,
            "wall_s": time.perf_counter() - started,
            "loss_kd": epochs[-1]["loss/kd"], "loss_total": epochs[-1]["loss/total"],
            "dev_accuracy": epochs[-1]["dev"]["accuracy"]}


def summarise(runs: list[dict]) -> dict:
    seconds = [value for run in runs for value in run["epoch_seconds"]]
    epoch = statistics.median(seconds)
    steps = runs[0]["steps_per_epoch"]
    return {"runs": runs, "epoch_s": epoch, "steps_per_epoch": steps, "steps_per_s": steps / epoch,
            "ms_per_step": 1000 * epoch / steps, "loss_total": runs[-1]["loss_total"],
            "dev_accuracy": runs[-1]["dev_accuracy"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from kd.batching import TEACHER_LOGITS
    from stages.models import resolve_model_source

    model_dir = resolve_model_source(args.teacher)
    train = rt_rows(args.rows, args.seed)
    dev = rt_rows(args.dev_rows, args.seed, offset=args.rows)
    online = online_kd()
    runs: dict[int, dict[str, list[dict]]] = {layers: {"cached": [], "online": []} for layers in args.layers}
    with tempfile.TemporaryDirectory(prefix="bench_cached_vs_online_") as scratch:
        scratch = Path(scratch)
        console.print(f"caching teacher logits for {args.rows} rows")
        labelled, label_seconds = label_in_process(train, model_dir, NUM_LABELS, args.max_length, args.threads,
                                                   LABEL_BATCH, args.seed)
        paths = {"cached": scratch / "cached.parquet", "online": scratch / "online.parquet"}
        labelled.to_parquet(paths["cached"])
        # Without the column: the step would otherwise take the cached logits even with the teacher online.
        labelled.drop(columns=[TEACHER_LOGITS]).to_parquet(paths["online"])
        dev.to_parquet(scratch / "dev.parquet")
        for layers in args.layers:
            for repeat in range(args.repeats):
                for variant, method in (("cached", "kd"), ("online", online)):
                    console.print(f"{layers}-layer student, run {repeat + 1}/{args.repeats}: {variant} ({method})")
                    runs[layers][variant].append(
                        train_once(method, layers, paths[variant], scratch / "dev.parquet", model_dir, args))

    results = {
        "students": {str(layers): compare(variants, label_seconds["predict_s"]) for layers, variants in runs.items()},
        "labelling": {**label_seconds, "rows": args.rows, "batch_size": LABEL_BATCH},
        "paper": {**PAPER_SECONDS, "online_over_cached": PAPER_SECONDS["online"] / PAPER_SECONDS["cached"]},
    }
    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def compare(variants: dict[str, list[dict]], caching_seconds: float) -> dict:
    """One student size: both variants' epochs and what the online teacher costs against the cache."""
    cached, online = summarise(variants["cached"]), summarise(variants["online"])
    extra = online["epoch_s"] - cached["epoch_s"]
    return {
        "cached": cached, "online": online,
        "online_over_cached": online["epoch_s"] / cached["epoch_s"],
        # Same teacher head, rows, batches and seed: the two runs must train the same student, so their losses
        # agree to float rounding; a gap means the variants did not compute the same thing.
        "loss_difference": abs(online["loss_total"] - cached["loss_total"]),
        "teacher_ms_per_step": 1000 * extra / cached["steps_per_epoch"],
        # Caching costs one no-grad teacher pass; it pays off once the epochs' saved teacher passes exceed it.
        "break_even_epochs": caching_seconds / extra if extra > 0 else None,
    }


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    students = results["students"]
    print_table(
        f"Hinton KD, {args.rows} rows, batch {args.batch_size}, {args.precision}, {args.threads} threads",
        ["student layers", "teacher logits", "epoch s", "steps/s", "ms/step", "last-epoch loss", "dev accuracy"],
        [[layers, variant, f"{r['epoch_s']:.1f}", f"{r['steps_per_s']:.2f}", f"{r['ms_per_step']:.0f}",
          f"{r['loss_total']:.4g}", f"{r['dev_accuracy']:.3f}"]
         for layers, student in students.items() for variant, r in (("cached", student["cached"]),
                                                                   ("online", student["online"]))],
        caption=machine_line(machine),
    )
    labelling = results["labelling"]
    print_table(
        f"Cost of the online teacher (TextSmooth's paper: 233 s ÷ 92 s = {results['paper']['online_over_cached']:.2f}x; "
        f"caching pass {labelling['predict_s']:.1f} s + {labelling['load_s']:.1f} s model load, no grad, batch "
        f"{labelling['batch_size']})",
        ["student layers", "online ÷ cached", "teacher forward a step", "caching pays off after",
         "|online − cached| loss (same work: ~0)"],
        [[layers, f"{s['online_over_cached']:.2f}x", f"{s['teacher_ms_per_step']:.0f} ms",
          f"{s['break_even_epochs']:.2f} epochs" if s["break_even_epochs"] is not None else "never (online no slower)",
          f"{s['loss_difference']:.2g}"] for layers, s in students.items()],
    )


if __name__ == "__main__":
    main()
