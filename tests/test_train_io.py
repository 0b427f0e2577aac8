"""RayTrainIO inside a Ray Train worker, with the worker's context and dataset shards stood in for."""

from types import SimpleNamespace

import numpy as np
import ray.train

from stages.distill import RayTrainIO


class CountingShard:
    """A dataset shard that counts its passes: each one is a Ray Data execution of its own."""

    def __init__(self, rows: int):
        self.rows, self.passes = rows, 0

    def iter_batches(self, batch_size: int, batch_format: str):
        self.passes += 1
        for start in range(0, self.rows, batch_size):
            yield {"label": np.arange(start, min(start + batch_size, self.rows))}


def test_dev_rows_are_read_once_and_served_again_every_epoch(monkeypatch):
    dev = CountingShard(rows=10)
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1))
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: {"dev": dev}[name])
    io = RayTrainIO()
    epochs = [[batch["label"].tolist() for batch in io.dev_rows(batch_size=4)] for _ in range(3)]
    assert epochs[0] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert epochs[1] == epochs[2] == epochs[0]
    assert dev.passes == 1
    assert [len(batch["label"]) for batch in io.dev_rows(batch_size=8)] == [8, 2]
    assert dev.passes == 2

