"""The C-MLM soft-target stage (``stages.cmlm_topk``) against a bare PyTorch loop in one process.

Both run the stage's own ``CmlmTopKPredictor`` (the same masked LM, k, rounds, lengths, batch size and torch
threads) over the same WordNet definition pairs, so the ratio is what Ray Data costs on top of the same compute.
The masked LM is the packaged MiniLM under a masked-LM head, not fine-tuned: what a reading costs does not depend
on the weights. The bare loop runs first, before Ray starts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import console, machine_info, machine_line, print_table, write_results

NAME = "bench_cmlm_topk"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="Train pairs of wordnet-definitions (default: 2000).")
    parser.add_argument("--teacher", default=PACKAGED_TEACHER, help="The checkpoint read as a masked LM.")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128, help="label.batch_size: pairs per actor call.")
    parser.add_argument("--threads", type=int, default=2, help="Torch threads, in the loop and in the actor.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 64 pairs.")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = 64
    return args


def bare_readings(pairs, model_dir: str, cfg) -> dict:
    """Read every pair's top-k in this process, in the stage's batches: the floor the stage is measured against."""
    from stages.cmlm_topk import CmlmTopKPredictor

    started = time.perf_counter()
    predictor = CmlmTopKPredictor(model_dir, cfg.max_source_length, cfg.max_target_length, cfg.k, cfg.rounds,
                                  cfg.temperature, cfg.label.threads_per_actor)
    loaded = time.perf_counter()
    tokens = 0
    for start in range(0, len(pairs), cfg.label.batch_size):
        rows = pairs.iloc[start:start + cfg.label.batch_size]
        ids, _ = predictor.readings(rows["source"].tolist(), rows["target"].tolist())
        tokens += sum(len(row) for row in ids)
    total = time.perf_counter() - started
    return {"model_load_s": loaded - started, "read_s": total - (loaded - started), "total_s": total,
            "rows_per_s": len(pairs) / total, "target_tokens": tokens}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from kd.checkpoints import load_tokenizer
    from kd.layout import MLM_DIR
    from kd.mlm import masked_lm_from
    from pipeline.artifacts import Artifact
    from pipeline.config import RayConfig
    from pipeline.ray_session import ensure_ray
    from stages import cmlm_topk
    from stages.config import LabelConfig
    from stages.data import load_wordnet_definitions
    from stages.models import resolve_model_source

    source = resolve_model_source(args.teacher)
    cfg = cmlm_topk.Config(label=LabelConfig(batch_size=args.batch_size, actors=1, threads_per_actor=args.threads),
                           k=args.k, rounds=args.rounds)
    pairs = load_wordnet_definitions().head(args.pairs)[["source", "target"]].reset_index(drop=True)
    with tempfile.TemporaryDirectory(prefix="bench_cmlm_topk_") as scratch:
        scratch = Path(scratch)
        teacher, data = scratch / "teacher", scratch / "data"
        masked_lm_from(source).save_pretrained(teacher / MLM_DIR)
        load_tokenizer(source).save_pretrained(teacher / MLM_DIR)
        data.mkdir()
        pairs.to_parquet(data / "train.parquet", index=False)

        console.print(f"bare loop: {len(pairs)} pairs")
        bare = bare_readings(pairs, str(teacher / MLM_DIR), cfg)
        console.print("starting Ray")
        started = time.perf_counter()
        ensure_ray(RayConfig(address="local"))
        ray_init_s = time.perf_counter() - started
        console.print(f"the cmlm_topk stage: {len(pairs)} pairs")
        (scratch / "out").mkdir()
        stage = cmlm_topk.run(cfg, {"data": Artifact("data", "bench", data),
                                    "cmlm_teacher": Artifact("cmlm_teacher", "bench", teacher)},
                              None, scratch / "out")
    if stage["rows"] != len(pairs):
        raise RuntimeError(f"the stage wrote {stage['rows']} rows, expected {len(pairs)}")
    tokens = bare["target_tokens"]
    results = {"pairs": len(pairs), "target_tokens": tokens, "bare": bare, "stage": stage, "ray_init_s": ray_init_s,
               "bare_over_stage": bare["rows_per_s"] / stage["rows_per_second"]}
    print_table(f"C-MLM top-k readings: {len(pairs)} pairs, {tokens} target tokens, k {args.k}, {args.rounds} rounds, "
                f"batch {args.batch_size}, {args.threads} torch threads",
                ["", "seconds", "pairs/s", "target tokens/s"],
                [["bare loop (model load included)", f"{bare['total_s']:.1f}", f"{bare['rows_per_s']:.1f}",
                  f"{tokens / bare['total_s']:.0f}"],
                 ["cmlm_topk stage (Ray Data)", f"{stage['seconds']:.1f}", f"{stage['rows_per_second']:.1f}",
                  f"{tokens / stage['seconds']:.0f}"],
                 ["Ray start (once per run)", f"{ray_init_s:.1f}", "-", "-"]],
                caption=f"bare ÷ stage: {results['bare_over_stage']:.2f}×. {machine_line(machine)}")
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


if __name__ == "__main__":
    main()
