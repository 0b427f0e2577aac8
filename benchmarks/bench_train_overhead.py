"""Ray Train overhead: one student's training loop in a TorchTrainer (ShardIO, one worker) against the same
loop in this process (LocalIO).

Both run ``train_student`` on the same job dict and the same Parquet rows (with cached teacher logits, as the
label stage writes them), for 2 epochs by default. The Ray run is the distill stage's own ``fit``. Each loop's
TrainIO is wrapped so that it logs when the loop has built its models, when each epoch's first rows arrive,
and when dev evaluation and reporting start and end. That separates the fixed start-up cost (from the call
to the first training batch) from steady-state steps/s, taken from the last epoch's ``epoch_seconds``.
The bare loop runs first, before Ray starts, so Ray's idle daemons do not slow it. Then ``--ray-fits`` students
train in Ray one after another in one Ray session, as a run's students do: the first also pays for what a Ray
session creates once (Ray Train's autoscaling coordinator, a detached actor its controller waits on; imports
not yet in the page cache), and the later ones show what each further student of a run costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable
from unittest import mock

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import (console, label_in_process, machine_info, machine_line, print_table, rt_rows,
                                write_results)

NAME = "bench_train_overhead"
NUM_LABELS = 2
LABEL_BATCH = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="Training rows of rt-snippets (default: 2000).")
    parser.add_argument("--dev-rows", type=int, default=256, help="Dev rows, evaluated after each epoch.")
    parser.add_argument("--epochs", type=int, default=2, help="At least 2: the last epoch is the steady state.")
    parser.add_argument("--layers", type=int, default=3, help="Student layers (default: 3 of the teacher's 6).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                        help="train.precision (default: bf16, as the quickstart's students).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="ray.torch_threads, also used by the bare loop (default: all cores, as the quickstart).")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray.cpus_per_worker (default: 1).")
    parser.add_argument("--teacher", default=PACKAGED_TEACHER, help="teacher.source (default: the packaged MiniLM).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-fits", type=int, default=3,
                        help="Students trained in Ray one after another, in one Ray session (default: 3). The first "
                             "pays for what a Ray session creates once (Ray Train's autoscaling coordinator, cold "
                             "imports); the later ones cost what every other student of a run costs.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 128 rows (4 steps an epoch), 32 dev rows.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dev_rows, args.epochs = 128, 32, 2
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch carries the data pipeline's warm-up")
    if args.ray_fits < 1:
        parser.error("--ray-fits must be at least 1")
    return args


def timed_loop(log_path: str, make_io: Callable[[dict], object]) -> Callable[[dict], object]:
    """A train loop that runs ``train_student(job, make_io(job))`` with the TrainIO wrapped in a recorder of
    wall-clock events. Built inside a function so that Ray pickles it, and the wrapper class, by value."""
    from kd.worker import train_student

    def log(event: str) -> None:
        with open(log_path, "a") as out:
            out.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid()}) + "\n")

    class TimedIO:
        def __init__(self, io):
            self.io, self.rank, self.world = io, io.rank, io.world

        def epoch_chunks(self, rows_per_chunk, seed):
            def marked():
                for index, chunk in enumerate(self.io.epoch_chunks(rows_per_chunk, seed)):
                    if index == 0:
                        log("first_rows")
                    yield chunk
            return marked()

        def dev_rows(self, batch_size):
            log("dev_start")
            return self.io.dev_rows(batch_size)

        def restore(self):
            log("built")  # train_student asks for a checkpoint right after building the distiller
            return self.io.restore()

        def report(self, metrics, directory):
            log("report_start")
            self.io.report(metrics, directory)
            log("report_end")

        def wrap(self, module, device):
            return self.io.wrap(module, device)

        def device(self):
            return self.io.device()

        def progress(self, line):
            self.io.progress(line)

    def loop(job: dict):
        log("entry")
        return train_student(job, TimedIO(make_io(job)), verbose=False)

    return loop


def timeline(called: float, done: float, log_path: Path, history: list[dict]) -> dict:
    """Seconds between the logged events, and steps/s per epoch from the loop's own ``epoch_seconds``."""
    events: dict[str, list[float]] = {}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        events.setdefault(record["event"], []).append(record["time"])
    epochs = [record for record in history if "epoch_seconds" in record]
    steps = [epochs[0]["step"]] + [b["step"] - a["step"] for a, b in zip(epochs, epochs[1:])]
    first = events["first_rows"][0]
    return {
        "to_loop_entry_s": events["entry"][0] - called,
        "build_models_s": events["built"][0] - events["entry"][0],
        "to_first_rows_s": first - events["built"][0],
        "startup_s": first - called,
        "epoch_seconds": [record["epoch_seconds"] for record in epochs],
        "steps_per_epoch": steps,
        "steps_per_s": [n / record["epoch_seconds"] for n, record in zip(steps, epochs)],
        "steady_steps_per_s": steps[-1] / epochs[-1]["epoch_seconds"],
        "dev_and_checkpoint_s": [r - d for d, r in zip(events["dev_start"], events["report_start"])],
        "report_s": [e - s for s, e in zip(events["report_start"], events["report_end"])],
        "teardown_s": done - events["report_end"][-1],
        "total_s": done - called,
        "end_to_end_steps_per_s": sum(steps) / (done - called),
        "dev_accuracy": epochs[-1]["dev"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from kd.training import TrainSettings
    from stages.config import RayConfig, RunPlace
    from pipeline.ray_session import ensure_ray
    from stages import distill
    from stages.models import resolve_model_source
    from kd.worker import LocalIO, train_job
    from stages.distill import DEV_PATH, ShardIO

    model_dir = resolve_model_source(args.teacher)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             precision=args.precision, seed=args.seed)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_overhead_") as scratch:
        scratch = Path(scratch)
        train_path, dev_path = scratch / "train.parquet", scratch / "dev.parquet"
        console.print(f"caching teacher logits for {args.rows} rows")
        labelled, _ = label_in_process(rt_rows(args.rows, args.seed), model_dir, NUM_LABELS, args.max_length,
                                       args.threads, LABEL_BATCH, args.seed)
        labelled.to_parquet(train_path)
        rt_rows(args.dev_rows, args.seed, offset=args.rows).to_parquet(dev_path)
        job = train_job(method="kd", params={"temperature": 4.0, "alpha": 0.9},
                        shape={"layers": args.layers, "init": "uniform"}, settings=settings, teacher=model_dir,
                        init_model=None, tokenizer=model_dir, max_length=args.max_length, num_labels=NUM_LABELS,
                        regression=False, train_rows=args.rows, train_path=str(train_path), torch_threads=args.threads)

        console.print("bare process (LocalIO)")
        log_path = scratch / "local.jsonl"
        loop = timed_loop(str(log_path), lambda job: LocalIO(train_path, dev_path))
        called = time.time()
        distiller = loop(job)
        results["local"] = timeline(called, time.time(), log_path, distiller.progress.history)

        console.print("starting Ray")
        started = time.perf_counter()
        ensure_ray(RayConfig(address="local"))
        results["ray_init_s"] = time.perf_counter() - started
        ray_cfg = RayConfig(address="local", num_workers=1, cpus_per_worker=args.cpus_per_worker,
                            torch_threads=args.threads, storage_path=str(scratch / "ray"))
        cfg = RunPlace(name="bench_train_overhead", workdir=scratch, ray=ray_cfg)
        make_io = lambda job: ShardIO(job["train_path"], job[DEV_PATH])  # noqa: E731  (pickled by value with the loop)
        fits = []
        for fit in range(args.ray_fits):
            console.print(f"Ray Train (TorchTrainer, ShardIO, 1 worker): student {fit + 1} of {args.ray_fits}")
            log_path = scratch / f"ray{fit}.jsonl"
            with mock.patch.object(distill, "train_loop_per_worker", timed_loop(str(log_path), make_io)):
                called = time.time()
                outcome = distill.fit(cfg, job, train_path, dev_path, f"bench-{uuid.uuid4().hex[:8]}",
                                      scratch / f"out{fit}")
            fits.append(timeline(called, time.time(), log_path, outcome["history"]))
        results["ray"], results["ray_later"] = fits[0], fits[1:]

    local, ray_run = results["local"], results["ray"]
    results["extra_startup_s"], results["steady_local_over_ray"] = overhead(local, [ray_run])
    results["end_to_end_local_over_ray"] = local["end_to_end_steps_per_s"] / ray_run["end_to_end_steps_per_s"]
    if results["ray_later"]:
        results["extra_startup_later_s"], results["steady_local_over_ray_later"] = overhead(local, results["ray_later"])
    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def overhead(local: dict, ray_runs: list[dict]) -> tuple[float, float]:
    """Ray's extra start-up (s) and the bare loop's steady steps/s over Ray's, from the median of ``ray_runs``."""
    startup = statistics.median(run["startup_s"] for run in ray_runs)
    steady = statistics.median(run["steady_steps_per_s"] for run in ray_runs)
    return startup - local["startup_s"], local["steady_steps_per_s"] / steady


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    runs = [results["local"], results["ray"], *results["ray_later"]]

    def joined(values: list[float], digits: int = 1) -> str:
        return " / ".join(f"{value:.{digits}f}" for value in values)

    def row(label: str, cell: Callable[[dict], str]) -> list[str]:
        return [label, *(cell(run) for run in runs)]

    rows = [
        ["Ray init (once per process)", "-", f"{results['ray_init_s']:.1f}", *("-" for _ in results["ray_later"])],
        row("call to loop entry", lambda run: f"{run['to_loop_entry_s']:.1f}"),
        row("build models (tokenizer, teacher, student, optimiser)", lambda run: f"{run['build_models_s']:.1f}"),
        row("wait for the first rows", lambda run: f"{run['to_first_rows_s']:.1f}"),
        row("start-up: call to first batch", lambda run: f"{run['startup_s']:.1f}"),
        row("epoch seconds (per epoch)", lambda run: joined(run["epoch_seconds"])),
        row("steps/s (per epoch)", lambda run: joined(run["steps_per_s"], 2)),
        row("steady-state steps/s (last epoch)", lambda run: f"{run['steady_steps_per_s']:.2f}"),
        row("dev eval + checkpoint save (per epoch)", lambda run: joined(run["dev_and_checkpoint_s"])),
        row("report (per epoch)", lambda run: joined(run["report_s"])),
        row("after the last report (teardown, copy out)", lambda run: f"{run['teardown_s']:.1f}"),
        row("total, call to return", lambda run: f"{run['total_s']:.1f}"),
        row("end-to-end steps/s", lambda run: f"{run['end_to_end_steps_per_s']:.2f}"),
        row("dev accuracy (last epoch)", lambda run: f"{run['dev_accuracy']:.3f}"),
    ]
    columns = ["seconds unless stated", "LocalIO", "Ray Train, student 1",
               *(f"student {index}" for index in range(2, len(runs)))]
    print_table(
        f"Training loop: bare process vs Ray Train ({args.rows} rows, {args.epochs} epochs of "
        f"{results['local']['steps_per_epoch'][-1]} steps, batch {args.batch_size}, {args.precision}, "
        f"{args.threads} threads; Ray's students one after another in one Ray session)",
        columns, rows, caption=machine_line(machine),
    )
    figures = [
        ["extra start-up (to first batch), first student", f"{results['extra_startup_s']:.1f} s"],
        ["steady state: bare ÷ Ray steps/s, first student", f"{results['steady_local_over_ray']:.2f}x"],
        ["end to end: bare ÷ Ray steps/s, first student", f"{results['end_to_end_local_over_ray']:.2f}x"],
    ]
    if results["ray_later"]:
        figures += [
            ["extra start-up, later students (median)", f"{results['extra_startup_later_s']:.1f} s"],
            ["steady state: bare ÷ Ray steps/s, later students (median)",
             f"{results['steady_local_over_ray_later']:.2f}x"],
        ]
    print_table("Ray Train overhead", ["figure", "value"], figures)


if __name__ == "__main__":
    main()
