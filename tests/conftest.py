"""Shared fixtures: tiny random BERTs for unit tests and one local Ray session for every Ray test."""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

# WordNet comes from Debian's wordnet-base, which a machine without apt-get cannot download.
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get to download wordnet-base")

WORDS = "the a movie film good bad great awful plot actor is was not very fun dull".split()


def reversed_pairs(count: int, seed: int) -> pd.DataFrame:
    """Synthetic seq2seq pairs over WORDS with something to learn: the target is 'the' and the source's words
    reversed, 2 to 9 words (so some are longer than a short max_target_length and get cut)."""
    rng = random.Random(seed)
    content = [word for word in WORDS if word not in ("the", "a")]
    rows = []
    for _ in range(count):
        words = rng.sample(content, rng.randint(1, 8))
        rows.append((" ".join(words), " ".join(["the", *reversed(words)])))
    return pd.DataFrame(rows, columns=["source", "target"], dtype="string")


def tiny_bert_config(**overrides) -> BertConfig:
    settings = dict(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=64, num_labels=2)
    settings.update(overrides)
    return BertConfig(**settings)


def toy_batch(labels: bool = True) -> dict[str, torch.Tensor]:
    """Four [CLS] w w w [SEP] rows over ids 5..13, rows 1 and 3 padded (id 0)."""
    input_ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0], [2, 9, 10, 11, 3], [2, 12, 13, 3, 0]])
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "token_type_ids": torch.zeros_like(input_ids)}
    if labels:
        batch["labels"] = torch.tensor([0, 1, 0, 1])
    return batch


def free_port() -> int:
    """A port nothing listens on now: the OS hands out an unused one, and closing the socket frees it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy machine the hand-offs cost 100×."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_teacher() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


@pytest.fixture(scope="session")
def tiny_tokenizer() -> BertTokenizerFast:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run: starting Ray costs 5-9 s here."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.ray_session import ensure_ray

    ensure_ray(RayConfig(address="local", num_cpus=2))
    yield ray
    ray.shutdown()


SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_pipeline(ray_session, tmp_path_factory):
    """The smoke profile run once through local Ray; later tests reuse its cached stages."""
    from rich.console import Console

    from pipeline.config import load_experiment
    from pipeline.runner import PipelineRunner

    workdir = tmp_path_factory.mktemp("smoke")
    exp = load_experiment(SMOKE_CONFIG, workdir=workdir)
    runner = PipelineRunner(exp, Console(width=160))
    summary = runner.run()
    return exp, runner, summary
