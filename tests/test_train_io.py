"""A student's rows inside a Ray Train worker (``stages.distill.ShardIO``), with the worker's context stood in for:
each worker reads its own share of the train Parquet, the shares are disjoint and equal, and every worker reads the
whole dev split."""

from types import SimpleNamespace

import pandas as pd
import ray.train

from stages.distill import ShardIO


def worker_io(monkeypatch, train_path, dev_path, rank: int, world: int) -> ShardIO:
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: rank, get_world_size=lambda: world))
    return ShardIO(str(train_path), str(dev_path))


def test_workers_read_disjoint_equal_shares_and_the_whole_dev_split(monkeypatch, tmp_path):
    train, dev = tmp_path / "train.parquet", tmp_path / "dev.parquet"
    pd.DataFrame({"row": range(11)}).to_parquet(train)
    pd.DataFrame({"row": range(5)}).to_parquet(dev)
    shares = [worker_io(monkeypatch, train, dev, rank, 3) for rank in range(3)]
    rows = [sorted(row for chunk in io.epoch_chunks(2, seed=rank) for row in chunk["row"])
            for rank, io in enumerate(shares)]
    assert rows == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 11 // 3 rows each, in lockstep; rows 9 and 10 are dropped
    assert all([row for chunk in io.dev_rows(2) for row in chunk["row"]] == list(range(5)) for io in shares)
    single = worker_io(monkeypatch, train, dev, 0, 1)
    first, again, other = ([row for chunk in single.epoch_chunks(4, seed) for row in chunk["row"]]
                           for seed in (7, 7, 8))
    assert sorted(first) == list(range(11)) and first == again and first != other
