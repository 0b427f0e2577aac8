"""The evaluation of a seq2seq student (a generation task): greedy and beam-search outputs on dev and test, scored
with sacreBLEU and ROUGE-L against the task's targets, the student's parameters and size on disk, and the
latency of greedy generation on CPU, as one Ray task (``kd.generation`` does the work). See docs/generation.md.

Writes ``test_greedy.txt`` and ``test_beam.txt``: one hypothesis a line, in test order, for paired tests between
systems (``kd.generation.paired_bootstrap``) and for reading.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch
from pydantic import Field
from transformers import AutoModelForSeq2SeqLM

from kd.checkpoints import load_tokenizer
from kd.evaluation import size_on_disk
from kd.generation import generate, generation_latencies, generation_latency, round_trip, text_scores
from kd.layout import STUDENT_DIR
from kd.students import count_parameters
from stages.cmlm_teacher import read_pairs
from stages.config import UNKEYED, StageConfig

SPLITS = ("dev", "test")
TEST_GREEDY, TEST_BEAM = "test_greedy.txt", "test_beam.txt"


class Config(StageConfig):
    """Decoding and timing of the evaluation. ``max_source_length`` must be the one the student was trained with
    (``cmlm.max_source_length``): the source is cut as it was then."""

    num_beams: int = Field(default=4, ge=1, description="Beams of the headline beam search (greedy is run too).")
    max_new_tokens: int = Field(default=64, ge=1, description="Most tokens generated per sentence, [SEP] included.")
    max_source_length: int = Field(default=64, ge=1, description="Source word pieces kept (special tokens not "
                                   "counted), as in training.")
    batch_size: int = Field(default=32, ge=1, json_schema_extra=UNKEYED,
                            description="Sentences per generate call (length-sorted batches).")
    latency_batch_size: int = Field(default=32, ge=1, description="Sentences in the timed greedy batch (the first "
                                    "of test).")
    latency_repeats: int = Field(default=5, ge=1, description="Timed runs; the median is reported.")
    threads: int | None = Field(default=None, ge=1, json_schema_extra=UNKEYED,
                                description="Torch threads, for decoding and timing (None: all cores).")

    def cpus_held(self) -> float:
        return 1.0  # the evaluation task's


def is_uncased(tokenizer) -> bool:
    """Whether the vocabulary lowercases its input: its outputs are then scored against lowercased references."""
    return bool(getattr(tokenizer, "do_lower_case", False))


def write_lines(path: Path, lines: list[str]) -> None:
    # A hypothesis holds no newline (the tokenizer treats it as a space), but a stray one would shift every line.
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")


def evaluate_generation(model_dir: str, data_dir: str, out_dir: str, settings: dict) -> dict:
    """The body of the stage's Ray task, callable without Ray: ``settings`` is the stage's ``Config`` dumped."""
    started = time.perf_counter()
    cfg = Config.model_validate(settings)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    lowercase = is_uncased(tokenizer)
    lengths = {"max_source_length": cfg.max_source_length, "max_new_tokens": cfg.max_new_tokens,
               "batch_size": cfg.batch_size}
    result: dict = {}
    for split in SPLITS:
        split_started = time.perf_counter()
        sources, references = read_pairs(Path(data_dir), split)
        greedy = generate(model, tokenizer, sources, num_beams=1, **lengths)
        beam = generate(model, tokenizer, sources, num_beams=cfg.num_beams, **lengths)
        beam_scores, greedy_scores = text_scores(beam, references, lowercase), text_scores(greedy, references, lowercase)
        ceiling = text_scores(round_trip(tokenizer, references, cfg.max_new_tokens), references, lowercase)
        result[split] = {"bleu": beam_scores["bleu"], "rougeL": beam_scores["rougeL"],
                         "bleu_greedy": greedy_scores["bleu"], "rougeL_greedy": greedy_scores["rougeL"],
                         "bleu_ceiling": ceiling["bleu"], "rougeL_ceiling": ceiling["rougeL"],
                         "sentences": len(sources)}
        if split == "test":
            write_lines(Path(out_dir) / TEST_GREEDY, greedy)
            write_lines(Path(out_dir) / TEST_BEAM, beam)
            test_sources = sources
        scores = result[split]
        print(f"[evaluate_generation] {split}: {len(sources)} sentences, BLEU {scores['bleu']:.2f} "
              f"(greedy {scores['bleu_greedy']:.2f}), ROUGE-L {scores['rougeL']:.4f} "
              f"(greedy {scores['rougeL_greedy']:.4f}), beams {cfg.num_beams} "
              f"({time.perf_counter() - split_started:.0f}s)", flush=True)
    latency = generation_latency(model, tokenizer, test_sources, batch_size=cfg.latency_batch_size,
                                 max_source_length=cfg.max_source_length, max_new_tokens=cfg.max_new_tokens,
                                 repeats=cfg.latency_repeats, threads=cfg.threads)
    result.update(params=count_parameters(model), size_bytes=size_on_disk(model.save_pretrained), latency=latency,
                  num_beams=cfg.num_beams, lowercase=lowercase, seconds=round(time.perf_counter() - started, 2))
    return result


def time_generators(model_dirs: list[str], data_dir: str, settings: dict) -> list[dict]:
    """Greedy generation speed of each saved student, all timed together (``kd.generation.generation_latencies``,
    interleaved), so that two students' speeds can be compared: each evaluation timed its student alone, under
    whatever else the machine was doing then."""
    cfg = Config.model_validate(settings)
    models = [AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval() for model_dir in model_dirs]
    tokenizers = [load_tokenizer(model_dir) for model_dir in model_dirs]
    sources, _ = read_pairs(Path(data_dir), "test")
    return generation_latencies(models, tokenizers, sources, batch_size=cfg.latency_batch_size,
                                max_source_length=cfg.max_source_length, max_new_tokens=cfg.max_new_tokens,
                                repeats=cfg.latency_repeats, threads=cfg.threads)


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    """``inputs["model"]``: an artifact whose ``student/`` is a saved seq2seq student with its tokenizer;
    ``inputs["data"]``: the task's ``dev.parquet`` and ``test.parquet`` with ``source`` and ``target``."""
    task = ray.remote(num_cpus=cfg.cpus_held())(evaluate_generation)
    return ray.get(task.remote(str(inputs["model"].path / STUDENT_DIR), str(inputs["data"].path), str(out),
                               cfg.model_dump()))
