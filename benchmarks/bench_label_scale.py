"""Label-stage scale: throughput and peak memory of ``stages.label.run`` as the corpus grows 10×.

A tiny randomly initialised BERT teacher (built from a ``BertConfig``, saved with ``save_pretrained`` next to a
tokenizer of its own) labels synthetic sentences through the real stage: Ray Data reads the Parquet in blocks,
streams them through the teacher actor pool and writes Parquet. A thread samples the resident memory of the
driver and of its whole process tree (the local Ray's GCS, raylet and workers are the driver's descendants).
Streaming means memory must not grow with the row count: the peaks at 100k and 1M rows should match.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import console, machine_info, machine_line, print_table, write_results

NAME = "bench_label_scale"
NUM_LABELS = 2
VOCAB_WORDS = 2000
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WRITE_CHUNK_ROWS = 50_000  # the input is written in chunks, so making it never holds a large corpus in memory
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="Corpus sizes, labelled in this order (default: 100000 1000000).")
    parser.add_argument("--batch-size", type=int, default=256, help="label.batch_size (default: 256).")
    parser.add_argument("--max-length", type=int, default=64, help="teacher.max_length in tokens (default: 64).")
    parser.add_argument("--actors", type=int, default=1, help="label.actors (default: 1).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per actor (default: 1).")
    parser.add_argument("--hidden", type=int, default=64, help="Teacher hidden size (default: 64).")
    parser.add_argument("--layers", type=int, default=2, help="Teacher layers (default: 2).")
    parser.add_argument("--sample-every", type=float, default=0.2, help="Seconds between memory samples.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sentences and the teacher's weights.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 10,000 and 50,000 rows.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = [10_000, 50_000]
    return args


def tiny_teacher(folder: Path, args: argparse.Namespace) -> Path:
    """A random two-class BERT and a word-level WordPiece vocabulary covering the synthetic words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tokens = SPECIAL_TOKENS + [f"w{i}" for i in range(VOCAB_WORDS)]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=len(tokens), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=2, intermediate_size=args.hidden * 2,
                        max_position_embeddings=max(64, args.max_length), num_labels=NUM_LABELS)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_corpus(path: Path, rows: int, seed: int) -> None:
    """``rows`` sentences of 4-40 random vocabulary words (so some exceed --max-length and are truncated)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd.batching import LABEL, TEXT_A

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(VOCAB_WORDS)])
    with pq.ParquetWriter(path, pa.schema([(TEXT_A, pa.string()), (LABEL, pa.int64())])) as writer:
        for start in range(0, rows, WRITE_CHUNK_ROWS):
            n = min(WRITE_CHUNK_ROWS, rows - start)
            lengths = rng.integers(4, 41, n)
            drawn = words[rng.integers(0, VOCAB_WORDS, lengths.sum())]
            texts = [" ".join(sentence) for sentence in np.split(drawn, np.cumsum(lengths)[:-1])]
            writer.write_table(pa.table({TEXT_A: texts, LABEL: rng.integers(0, NUM_LABELS, n)}))


class MemorySampler:
    """Peak resident memory of this process and of this process plus all its descendants, sampled in a thread.

    The tree's figure adds each process's RSS, so pages shared between processes (the object store's memory
    map, shared libraries) count once per process: an upper bound on what the tree holds."""

    def __init__(self, every: float):
        import psutil

        self.me = psutil.Process()
        self.every = every
        self._stop = threading.Event()
        self.driver_peak = self.tree_peak = self.processes_at_peak = 0
        self.samples = 0

    def sample(self) -> None:
        import psutil

        driver = self.me.memory_info().rss
        tree, processes = driver, 1
        for child in self.me.children(recursive=True):
            try:
                tree += child.memory_info().rss
                processes += 1
            except psutil.Error:  # exited between listing and reading
                pass
        self.driver_peak = max(self.driver_peak, driver)
        if tree > self.tree_peak:
            self.tree_peak, self.processes_at_peak = tree, processes
        self.samples += 1

    @contextmanager
    def running(self) -> Iterator["MemorySampler"]:
        def loop():
            while not self._stop.wait(self.every):
                self.sample()

        self.sample()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.sample()


def label_once(source: Path, rows: int, teacher: Path, out: Path, cfg, every: float) -> dict:
    """``stages.label.run`` over ``rows`` rows, with its wall time and memory peaks. The stage reads its inputs
    as artifacts: ``source`` is a data artifact's ``train.parquet``, ``teacher`` a teacher artifact's student."""
    from pipeline.artifacts import Artifact, write_result
    from stages import label

    data = Artifact("data", "bench", source.parent)
    write_result(data.path, {"rows": {"train": rows}})
    inputs = {"data": data, "teacher": Artifact("teacher", "bench", teacher.parent)}
    sampler = MemorySampler(every)
    baseline = sampler.me.memory_info().rss
    with sampler.running():
        started = time.perf_counter()
        result = label.run(cfg, inputs, None, out)
        seconds = time.perf_counter() - started
    if result["rows"] != rows:
        raise RuntimeError(f"the label stage wrote {result['rows']} rows, expected {rows}")
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "driver_rss_before_mib": baseline / MIB, "driver_peak_rss_mib": sampler.driver_peak / MIB,
            "tree_peak_rss_mib": sampler.tree_peak / MIB, "processes_at_tree_peak": sampler.processes_at_peak,
            "samples": sampler.samples}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    from pipeline.ray_session import ensure_ray
    from stages import label
    from stages.config import LabelConfig, RayConfig, TaskConfig, TeacherConfig
    from kd.layout import STUDENT_DIR

    results: dict = {"sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench_label_scale_") as scratch:
        scratch = Path(scratch)
        teacher = tiny_teacher(scratch / "teacher" / STUDENT_DIR, args)
        cfg = label.Config(
            task=TaskConfig(labels=list(range(NUM_LABELS))),
            teacher=TeacherConfig(source=str(teacher), max_length=args.max_length),
            label=LabelConfig(batch_size=args.batch_size, actors=args.actors, cpus_per_actor=1,
                              threads_per_actor=args.threads),
        )
        started = time.perf_counter()
        ensure_ray(RayConfig(address="local"))
        results["ray_init_s"] = time.perf_counter() - started
        for rows in args.rows:
            source = scratch / f"data{rows}" / "train.parquet"
            source.parent.mkdir()
            console.print(f"writing {rows:,} synthetic sentences")
            synthetic_corpus(source, rows, args.seed)
            console.print(f"label stage: {rows:,} rows")
            results["sizes"].append(label_once(source, rows, teacher, scratch / f"labelled{rows}", cfg,
                                               args.sample_every))
    smallest, largest = results["sizes"][0], results["sizes"][-1]
    results["growth"] = {key: largest[key] / smallest[key] for key in
                         ("rows", "driver_peak_rss_mib", "tree_peak_rss_mib", "rows_per_s")}
    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    growth = results["growth"]
    print_table(
        f"Label stage at scale: tiny teacher ({args.layers} layers, {args.hidden} wide), batch {args.batch_size}, "
        f"max length {args.max_length}, {args.actors} actor(s) × {args.threads} thread(s)",
        ["rows", "seconds", "rows/s", "driver RSS before (MiB)", "driver peak (MiB)", "tree peak (MiB)",
         "processes"],
        [[f"{s['rows']:,}", f"{s['seconds']:.1f}", f"{s['rows_per_s']:.0f}", f"{s['driver_rss_before_mib']:.0f}",
          f"{s['driver_peak_rss_mib']:.0f}", f"{s['tree_peak_rss_mib']:.0f}", s["processes_at_tree_peak"]]
         for s in results["sizes"]],
        caption=(f"{growth['rows']:.0f}× the rows: driver peak ×{growth['driver_peak_rss_mib']:.2f}, tree peak "
                 f"×{growth['tree_peak_rss_mib']:.2f}, throughput ×{growth['rows_per_s']:.2f}. Ray init "
                 f"{results['ray_init_s']:.1f} s (not in the figures). Tree = driver + GCS, raylet, dashboard and "
                 f"workers; RSS summed per process.\n{machine_line(machine)}"),
    )


if __name__ == "__main__":
    main()
