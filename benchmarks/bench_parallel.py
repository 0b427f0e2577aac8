"""Students of one run side by side against one after another: the wall time of K students' distill and evaluate
stages with ``ray.max_concurrent_stages: K`` and one torch thread each, against ``max_concurrent_stages: 1`` and
two threads each, on the same machine, in one process.

The experiment is the smoke profile (``configs/smoke.yaml``: 200 rows, the packaged MiniLM teacher fine-tuned one
epoch) with K ``kd`` students of 2 layers, one epoch each. Its data, teacher and soft labels are made once and
cached; then the students train serially and concurrently, each mode in a process (and a local Ray) of its own.
Each mode's students get their own train seeds, so neither reads the other's artifacts from the cache, and the
serial run comes first. What is timed is the
runner's ``execute_all`` over the students' nodes, with every stage's recorded start and end, so the overlap is
visible. A run that keeps all cores busy in both modes gains little; one whose stages leave cores idle (Ray Train
start-up, evaluation, one thread that does not scale) gains.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import REPO_ROOT, machine_info, machine_line, print_table, write_results

NAME = "bench_parallel"
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
# Concurrent workers ask for half a CPU each: K one-CPU trainers on 2 CPUs would leave none for the Ray Data
# reads that feed them, and wait forever (docs/cluster.md, "Two runs on one cluster"). Ray's CPUs are a
# reservation, not a limit; the torch threads are what share the cores.
MODES = {"serial": {"max_concurrent_stages": 1, "torch_threads": 2, "cpus_per_worker": 1.0},
         "concurrent": {"max_concurrent_stages": None, "torch_threads": 1, "cpus_per_worker": 0.5}}  # None: K


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=2, help="K students trained in each mode (default: 2).")
    parser.add_argument("--rows", type=int, default=1000, help="task.max_rows (default: 1000).")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs a student (default: 1).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 200 rows.")
    # One mode in this process, its figures written to a JSON file: how main() runs each mode.
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = 200
    return args


def experiment(args: argparse.Namespace, workdir: Path, mode: str, seed_offset: int):
    from pipeline.config import load_experiment

    settings = dict(MODES[mode])
    settings["max_concurrent_stages"] = settings["max_concurrent_stages"] or args.students
    def train(seed: int) -> str:
        return f"train: {{epochs: {args.epochs}, batch_size: 32, learning_rate: 1.0e-4, report_every: 10, seed: {seed}}}"

    students = ", ".join(f"{{name: kd_{i}, method: kd, student: {{layers: 2}}, {train(seed_offset + i)}}}"
                         for i in range(args.students))
    return load_experiment(SMOKE, [f"students=[{students}]", f"task.max_rows={args.rows}", "ray.num_cpus=null",
                                   f"ray.cpus_per_worker={settings['cpus_per_worker']}",
                                   f"ray.torch_threads={settings['torch_threads']}",
                                   f"ray.max_concurrent_stages={settings['max_concurrent_stages']}"],
                           workdir=workdir)


def run_mode(args: argparse.Namespace, workdir: Path, mode: str, seed_offset: int) -> dict:
    from rich.console import Console

    from pipeline.runner import PipelineRunner

    exp = experiment(args, workdir, mode, seed_offset)
    runner = PipelineRunner(exp, Console(stderr=True), verbose=False)
    runner.start()
    with runner.tracker.pipeline_run(exp.name, exp.model_dump(mode="json")):
        # Data, teacher and soft labels run first, in dependency order (cached in the second mode); the students'
        # figure is read from their own stages' recorded spans.
        _, (students,) = runner.plan()
        started = time.perf_counter()
        runner.execute_all()
        wall = time.perf_counter() - started
    spans = {}
    for student, (_, distill, evaluate) in students.items():
        for node in (distill, evaluate):
            result = runner.done[node].result()
            spans[node] = (result.get("started_at"), result.get("finished_at"), result.get("seconds"))
    stage_starts = [start for start, _, _ in spans.values() if start is not None]
    stage_ends = [end for _, end, _ in spans.values() if end is not None]
    return {"mode": mode, **MODES[mode], "students_wall_s": max(stage_ends) - min(stage_starts),
            "execute_all_s": wall, "stage_seconds": {name: seconds for name, (_, _, seconds) in spans.items()},
            "ran": runner.counts["ran"], "cached": runner.counts["cached"]}


SEED_OFFSETS = {"serial": 100, "concurrent": 200}


def run_mode_apart(argv: list[str], workdir: Path, mode: str) -> dict:
    """``run_mode`` in a process of its own, which starts and stops its own local Ray: the second mode starts
    from nothing the first left running (two pipeline runs in one process, one after the other, lost the local
    Ray's GCS at the second run's start on this machine while another Ray was running on it)."""
    out = workdir / f"{mode}.json"
    subprocess.run([sys.executable, __file__, *argv, "--mode", mode, "--workdir", str(workdir), "--out", str(out)],
                   check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.mode is not None:
        result = run_mode(args, Path(args.workdir), args.mode, SEED_OFFSETS[args.mode])
        Path(args.out).write_text(json.dumps(result))
        return result
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as folder:
        workdir = Path(folder)
        results = [run_mode_apart(argv, workdir, mode) for mode in ("serial", "concurrent")]
    serial, concurrent = results
    ratio = serial["students_wall_s"] / concurrent["students_wall_s"]
    print_table(f"{args.students} students, {args.rows} rows, {args.epochs} epoch(s)",
                ["mode", "stages at once", "threads a student", "students' wall s", "stages run"],
                [[r["mode"], r["max_concurrent_stages"] or args.students, r["torch_threads"],
                  f"{r['students_wall_s']:.0f}", r["ran"]] for r in results],
                caption=f"serial ÷ concurrent wall time: {ratio:.2f}×. {machine_line(machine)}")
    document = {"modes": results, "serial_over_concurrent": ratio}
    write_results(NAME, args.quick, machine, vars(args), document)
    return document


if __name__ == "__main__":
    main()
