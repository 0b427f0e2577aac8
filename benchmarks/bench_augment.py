"""Transfer-corpus throughput: the augment stage over the rt-snippets train split, then the label stage over
the augmented corpus against a bare PyTorch loop, in one run.

Augmentation runs the stage itself (``stages.augment.run``: Ray Data, Tang et al.'s rules, spaCy tags from the
packaged ``en_core_web_sm``) on the train split the data stage writes (8,454 sentences) with N copies each,
while a thread samples the memory of this process and of its whole process tree (Ray's daemons, workers and
actors). Labelling takes a seeded sample of the augmented corpus's rows (all 170k would take about 20 minutes
on 2 CPUs) through the label stage's functions and through a bare loop over the same teacher, batch size and
threads, as ``bench_label.py`` does: Ray is shut down for the bare loop and started again after it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import (REPO_ROOT, PeakMemory, actor_spans, add_label_arguments, bare_label, console,
                                label_comparison, label_config, machine_info, machine_line, print_label_tables,
                                print_table, ray_label, timed_actor, write_results)

NAME = "bench_augment"
QUICKSTART_TEACHERS = REPO_ROOT / "runs" / "quickstart" / "artifacts" / "teacher"


def quickstart_teacher() -> str | None:
    """The fine-tuned teacher of this checkout's quickstart run (the newest complete one), if there is one."""
    from pipeline.artifacts import COMPLETE_MARKER
    from kd.layout import STUDENT_DIR

    markers = sorted(QUICKSTART_TEACHERS.glob(f"*/{COMPLETE_MARKER}"), key=lambda marker: marker.stat().st_mtime)
    return str(markers[-1].parent / STUDENT_DIR) if markers else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PACKAGED_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="augment.copies per sentence (default: Tang's 20).")
    parser.add_argument("--augment-actors", type=int, default=1, help="augment.actors (default: 1).")
    parser.add_argument("--augment-batch-size", type=int, default=64,
                        help="augment.batch_size, sentences per actor call (default: 64, the config's).")
    parser.add_argument("--max-rows", type=int, default=None, help="task.max_rows: cap every split (default: none).")
    parser.add_argument("--label-rows", type=int, default=20_000,
                        help="Augmented rows to label, a seeded sample (default: 20000; 0: all).")
    parser.add_argument("--augment-only", action="store_true", help="Augment only; no labelling.")
    add_label_arguments(parser)
    parser.add_argument("--teacher", default=None,
                        help="teacher.source (default: the quickstart's fine-tuned teacher under "
                             f"{QUICKSTART_TEACHERS.relative_to(REPO_ROOT)} if a run made one, else {PACKAGED_TEACHER} "
                             "with a fresh classifier).")
    parser.add_argument("--memory-interval", type=float, default=0.2, help="Seconds between memory samples.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the label sample.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 200-row splits, 2 copies, 256 rows labelled, "
                                                             "batch 64.")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_rows, args.copies, args.label_rows, args.batch_size = 200, 2, 256, 64
    if args.teacher is None:
        args.teacher = quickstart_teacher() or PACKAGED_TEACHER
    return args


def augment_stage(data_dir: Path, out: Path, args: argparse.Namespace, log_path: Path) -> dict:
    """``stages.augment.run`` on the data stage's output, its actor timed and the POS-vocabulary pass (the
    tagging pass over the split that runs before augmenting) timed on its own, under a memory sampler."""
    from pipeline.artifacts import Artifact
    from stages import augment
    from stages.config import AugmentConfig, LabelConfig, TeacherConfig

    cfg = augment.Config(augment=AugmentConfig(rule="tang", copies=args.copies, actors=args.augment_actors,
                                               batch_size=args.augment_batch_size),
                         teacher=TeacherConfig(source=args.teacher, max_length=args.max_length), label=LabelConfig())
    vocabulary_pass = {}

    def timed_pos_vocabulary(source):
        started = time.perf_counter()
        vocabulary = pos_vocabulary(source)
        vocabulary_pass["s"] = time.perf_counter() - started
        return vocabulary

    pos_vocabulary = augment.pos_vocabulary
    started = time.time()
    with (mock.patch.object(augment, "pos_vocabulary", timed_pos_vocabulary),
          mock.patch.object(augment, "TangAugmenter", timed_actor(augment.TangAugmenter, str(log_path))),
          PeakMemory(args.memory_interval) as memory):
        facts = augment.run(cfg, {"data": Artifact("data", "bench", data_dir)}, None, out)
    total = time.time() - started
    spans = actor_spans(log_path, started)
    if spans["rows_out"] != facts["rows"]:
        raise RuntimeError(f"the augmenting actors wrote {spans['rows_out']} rows, the stage counted {facts['rows']}")
    augmenting = total - vocabulary_pass["s"]
    return {
        **facts, "total_s": total, "pos_vocabulary_s": vocabulary_pass["s"],
        "sentences_per_s": facts["sentences"] / total, "rows_per_s": facts["rows"] / total,
        "sentences_per_s_after_pos_pass": facts["sentences"] / augmenting,
        "actors": spans["actors"], "batches": spans["batches"], "actor_init_s": spans["actor_init_s"],
        "in_call_s": spans["in_call_s"], "call_sentences_per_s": spans["rows_in"] / spans["in_call_s"],
        "memory": memory.report(),
    }


def label_sample(corpus_dir: Path, rows: int, seed: int, out_path: Path) -> int:
    """A seeded sample of the corpus's rows written to ``out_path`` (all of them when ``rows`` is 0 or more
    than it has); returns its size. Rows are put in text order first, so the sample does not depend on the
    order Ray Data wrote its files in."""
    import pandas as pd

    from kd.batching import LABEL, TEXT_A

    corpus = pd.read_parquet(corpus_dir).sort_values([TEXT_A, LABEL], kind="stable").reset_index(drop=True)
    sample = corpus if rows == 0 or rows >= len(corpus) else corpus.sample(rows, random_state=seed)
    sample.to_parquet(out_path, index=False)
    return len(sample)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    import ray

    from pipeline.artifacts import write_result
    from pipeline.config import RayConfig, TaskConfig
    from pipeline.ray_session import ensure_ray
    from stages import data
    from stages.models import resolve_model_source
    from stages.teacher import load_candidate

    model_dir = resolve_model_source(args.teacher)
    # Whether the logits are a trained classifier's, or a fresh head's (right compute, meaningless values).
    _, classifier = load_candidate(model_dir, TaskConfig().num_labels)
    results: dict = {"teacher": {"source": args.teacher, "classifier": classifier}}
    with tempfile.TemporaryDirectory(prefix="bench_augment_") as scratch:
        scratch = Path(scratch)
        data_dir = scratch / "data"
        data_dir.mkdir()
        write_result(data_dir, data.prepare(TaskConfig(max_rows=args.max_rows), data_dir))

        console.print("starting Ray")
        started = time.perf_counter()
        ensure_ray(RayConfig(address="local"))
        results["ray_init_s"] = time.perf_counter() - started
        console.print(f"augment stage: Tang rules, {args.copies} copies a sentence")
        results["augment"] = augment_stage(data_dir, scratch / "augment", args, scratch / "augment_events.jsonl")

        if not args.augment_only:
            rows = label_sample(scratch / "augment" / "data", args.label_rows, args.seed, scratch / "label_in.parquet")
            cfg = label_config(args.teacher, args.max_length, args.batch_size, args.actors, args.cpus_per_actor,
                               args.threads)
            ray.shutdown()  # the bare loop runs with no Ray daemons beside it, as in bench_label.py
            console.print(f"bare loop: {rows} augmented rows")
            with PeakMemory(args.memory_interval) as bare_memory:
                bare = bare_label(scratch / "label_in.parquet", scratch / "bare.parquet", model_dir, cfg)
            bare["memory"] = bare_memory.report()
            started = time.perf_counter()
            ensure_ray(RayConfig(address="local"))
            label_init_s = time.perf_counter() - started
            console.print(f"Ray Data label stage: {rows} augmented rows")
            with PeakMemory(args.memory_interval) as ray_memory:
                ray_run = ray_label(scratch / "label_in.parquet", scratch / "labelled", rows, model_dir, cfg,
                                    scratch / "label_events.jsonl")
            ray_run["memory"] = ray_memory.report()
            results["label"] = {"ray_init_s": label_init_s, **label_comparison(rows, bare, ray_run, label_init_s)}

    report(results, args, machine)
    write_results(NAME, args.quick, machine, vars(args), results)
    return results


def report(results: dict, args: argparse.Namespace, machine: dict) -> None:
    a = results["augment"]
    memory = a["memory"]
    print_table(
        f"Augment stage: Tang rules, {args.copies} copies a sentence, {a['actors']} actor(s), "
        f"{args.augment_batch_size} sentences a call",
        ["figure", "value"],
        [["train sentences", a["sentences"]], ["output rows (originals + distinct copies)", a["rows"]],
         ["stage seconds (POS pass, augment, write, count)", f"{a['total_s']:.1f}"],
         ["  of which the POS-vocabulary pass", f"{a['pos_vocabulary_s']:.1f}"],
         ["  of which the actor's constructor (spaCy load)", f"{a['actor_init_s']:.1f}"],
         ["  of which inside __call__ (tagging, augmenting)", f"{a['in_call_s']:.1f}"],
         ["sentences/s", f"{a['sentences_per_s']:.0f}"], ["output rows/s", f"{a['rows_per_s']:.0f}"],
         ["sentences/s after the POS pass", f"{a['sentences_per_s_after_pos_pass']:.0f}"],
         ["sentences/s inside __call__", f"{a['call_sentences_per_s']:.0f}"],
         ["peak driver RSS, MiB (before)", f"{memory['peak_driver_rss_mib']:.0f} ({memory['before_driver_rss_mib']:.0f})"],
         ["peak process-tree RSS, MiB (before)", f"{memory['peak_tree_rss_mib']:.0f} ({memory['before_tree_rss_mib']:.0f})"],
         ["peak process-tree PSS, MiB (before)", f"{memory['peak_tree_pss_mib']:.0f} ({memory['before_tree_pss_mib']:.0f})"],
         ["peak processes in the tree", memory["peak_tree_processes"]]],
        caption=f"Ray init {results['ray_init_s']:.1f} s, not in the stage seconds. " + machine_line(machine),
    )
    if "label" not in results:
        return
    label = results["label"]
    teacher = results["teacher"]
    print_label_tables(
        [label], label["ray_init_s"],
        f"Label stage over the augmented corpus: Ray Data vs a bare loop (batch {args.batch_size}, "
        f"{args.threads} torch threads, {args.actors} actor(s))",
        f"teacher {teacher['source']} ({'its classifier' if teacher['classifier'] else 'a fresh classifier head'}); "
        + machine_line(machine))
    print_table("Label stage memory (MiB)", ["run", "peak driver RSS", "peak tree RSS", "peak tree PSS"],
                [[run, *(f"{label[run]['memory'][f'peak_{name}_mib']:.0f}" for name in ("driver_rss", "tree_rss", "tree_pss"))]
                 for run in ("bare", "ray")])


if __name__ == "__main__":
    main()
