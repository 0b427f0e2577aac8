"""General distillation's stream: throughput and peak memory of ``stages.general.run`` as the corpus grows 10×.

The real stage on the real models: the packaged MiniLM (``teacher.source``) teaches the 4-layer, 256-wide student
with 128-wide embeddings of ``configs/tinybert_recipe.yaml`` for a fixed number of steps, over WordNet's sentences
repeated to 100k and to 1M lines in a text file that Ray Data streams. The steps are the same at both sizes, so
the work is too: only the corpus behind the stream grows. Streaming means memory must stay flat: the peaks at the
two sizes should match. Throughput (sentences and tokens a second) is the stage's own steady-state figure (its
first segment, which carries the start-up, left out).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import PeakMemory, console, machine_info, machine_line, print_table, write_results

NAME = "bench_general"
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tinybert_recipe.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="Corpus sizes in lines, run in this order (default: 100000 1000000).")
    parser.add_argument("--steps", type=int, default=60, help="Optimiser steps at each size (default: 60).")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="Steps a segment (default: 20).")
    parser.add_argument("--workers", type=int, default=1, help="ray.num_workers (default: 1).")
    parser.add_argument("--threads", type=int, default=2, help="Torch threads a worker (default: 2).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2,000 and 20,000 lines, 6 steps.")
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences, args.steps, args.checkpoint_every = [2_000, 20_000], 6, 2
    return args


def write_corpus(path: Path, lines: int) -> None:
    """WordNet's sentences, repeated in order to ``lines`` lines, written as they are read (never all in memory)."""
    from stages.corpus import fetch_wordnet

    source = fetch_wordnet()
    with path.open("w", encoding="utf-8") as out:
        sentences = itertools.chain.from_iterable(source.open(encoding="utf-8") for _ in itertools.count())
        for line in itertools.islice(sentences, lines):
            out.write(line)


def recipe_entry(args: argparse.Namespace):
    from pipeline.config import load_experiment

    exp = load_experiment(RECIPE)
    entry = exp.general[0]
    train = entry.train.model_copy(update={"steps": args.steps, "checkpoint_every": args.checkpoint_every,
                                           "report_every": args.checkpoint_every})
    return exp, entry, train


def run_once(corpus: Path, lines: int, args: argparse.Namespace, scratch: Path) -> dict:
    from stages import general
    from stages.config import CorpusConfig, RayConfig

    exp, entry, train = recipe_entry(args)
    entry = entry.model_copy(update={"corpus": CorpusConfig(source=str(corpus)), "train": train})
    ray_config = RayConfig(address="local", num_workers=args.workers, cpus_per_worker=1, torch_threads=args.threads,
                           storage_path=str(scratch / "ray"))
    cfg = general.Config(name=f"bench-general-{lines}", workdir=scratch, ray=ray_config, general=entry,
                         teacher=exp.teacher)
    out = scratch / f"out-{lines}"
    out.mkdir()
    started = time.perf_counter()
    with PeakMemory() as memory:
        result = general.run(cfg, {}, SimpleNamespace(key=f"{lines}-{time.time_ns()}"), out)
    return {"lines": lines, "wall_s": time.perf_counter() - started, "steps": args.steps,
            "sentences_per_second": result["sentences_per_second"], "tokens_per_second": result["tokens_per_second"],
            "worker_peak_rss_mb": result["peak_rss_mb"], **memory.report(),
            "final_losses": result["final"]}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    machine = machine_info()
    from pipeline.ray_session import ensure_ray
    from stages.config import RayConfig

    ensure_ray(RayConfig(address="local"), log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-general-") as folder:
        scratch = Path(folder)
        for lines in args.sentences:
            corpus = scratch / f"corpus-{lines}.txt"
            write_corpus(corpus, lines)
            console.print(f"general distillation, {args.steps} steps over a {lines:,}-line corpus …")
            results.append(run_once(corpus, lines, args, scratch))
            corpus.unlink()
    print_table(
        f"General distillation stream ({args.workers} worker(s), {args.threads} threads, {args.steps} steps)",
        ["corpus lines", "wall s", "sentences/s", "tokens/s", "worker peak RSS MiB", "tree peak PSS MiB"],
        [[f"{r['lines']:,}", f"{r['wall_s']:.0f}", f"{r['sentences_per_second']:.0f}",
          f"{r['tokens_per_second']:.0f}", f"{r['worker_peak_rss_mb']:.0f}", f"{r['peak_tree_pss_mib']:.0f}"]
         for r in results],
        caption=machine_line(machine))
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


if __name__ == "__main__":
    main()
