"""Every registered method at one budget: runs ``python -m pipeline run CONFIG --seeds N`` and collects its report.

The pipeline runs as a subprocess exactly as a user would run it (its own output streams through). Afterwards
the per-seed summaries in the workdir are read back (``pipeline.summary.load_summaries``), the report table
(``pipeline.summary.workdir_table``: mean ± std over seeds, gain over the baseline of each student's shape,
within-noise flags; BLEU for a generation task) is printed, and the run's ``report.md`` is copied next to this benchmark's JSON. Stages already in the workdir's
cache are not recomputed, so the wall time is only a training cost on a fresh workdir.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import REPO_ROOT, console, machine_info, result_path, write_results

NAME = "bench_methods"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "benchmark.yaml"
QUICK_WORKDIR = REPO_ROOT / "runs" / "bench_methods_quick"  # its own cache: a smoke run leaves the real workdir alone


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Experiment file (default: configs/benchmark.yaml).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per student (default: 3).")
    parser.add_argument("--workdir", default=None, help="Overrides the config's workdir.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Passed on to `pipeline run --set` (repeatable).")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: 200 rows, every epoch count 1, 1 seed, workdir runs/bench_methods_quick.")
    args = parser.parse_args(argv)
    # Another config's results go beside, not over, the benchmark's own.
    stem = Path(args.config).stem
    args.name = NAME if Path(args.config).resolve() == DEFAULT_CONFIG.resolve() else f"{NAME}_{stem}"
    if args.quick:
        args.seeds = 1
        args.workdir = args.workdir or str(QUICK_WORKDIR)
        args.overrides = quick_overrides(args.config) + args.overrides
    return args


def quick_overrides(config: str) -> list[str]:
    """200 rows and one epoch everywhere: the teacher's, each student's, and each ``*_epochs`` phase length a
    method's params set (TinyBERT's intermediate and prediction phases); 10 masked-LM steps and one augmented copy."""
    from pipeline.config import load_experiment

    exp = load_experiment(config)
    overrides = ["task.max_rows=200", "teacher.train.epochs=1", "augment.copies=1", "cmlm.steps=10"]
    if exp.teacher.mlm is not None:
        overrides.append("teacher.mlm.steps=10")
    for spec in exp.students:
        overrides.append(f"students.{spec.name}.train.epochs=1")
        overrides += [f"students.{spec.name}.params.{field}=1" for field, value in spec.params.model_dump().items()
                      if field.endswith("_epochs") and value is not None]
    return overrides


def copy_report(workdir: Path, report_copy: Path) -> Path:
    """The run's report and the figures it links, next to this benchmark's JSON; each figure's name gets the report's
    name in front (a quick run's figures must not replace the real run's), and the report's links follow."""
    from pipeline.report import REPORT_FILE

    report_copy.parent.mkdir(parents=True, exist_ok=True)
    text = (workdir / REPORT_FILE).read_text()
    for name in sorted(set(re.findall(r"\]\(([^)/]+\.png)\)", text))):
        target = report_copy.with_name(f"{report_copy.stem}_{name}")
        shutil.copyfile(workdir / name, target)
        text = text.replace(f"]({name})", f"]({target.name})")
    report_copy.write_text(text)
    return report_copy


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from pipeline.config import load_experiment
    from pipeline.summary import load_summaries, workdir_table

    command = [sys.executable, "-m", "pipeline", "run", args.config, "--seeds", str(args.seeds),
               *(part for override in args.overrides for part in ("--set", override))]
    if args.workdir:
        command += ["--workdir", args.workdir]
    console.print(f"running: {' '.join(command)}")
    started = time.perf_counter()
    # The pipeline runs in this process's folder, so relative paths in the config mean the same to both.
    returncode = subprocess.run(command).returncode
    seconds = time.perf_counter() - started
    if returncode != 0:
        console.print(f"[red]the pipeline exited with {returncode}; no results written[/red]")
        raise SystemExit(returncode)

    workdir = load_experiment(args.config, args.overrides, args.workdir).workdir
    summaries = load_summaries(workdir)
    console.print(workdir_table(summaries))
    report_copy = copy_report(workdir, result_path(args.name, args.quick, ".md"))
    results = {"pipeline_command": command, "wall_s": seconds, "workdir": str(workdir),
               "report": report_copy.name, "summaries": [summary.model_dump(mode="json") for summary in summaries]}
    write_results(args.name, args.quick, machine, vars(args), results)
    return results


if __name__ == "__main__":
    main()
