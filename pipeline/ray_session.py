"""Starting or joining Ray, the same way for a laptop and a cluster."""

from __future__ import annotations

import logging
import os

import ray

from stages.errors import StageError


# Workers iterate small datasets every epoch; their progress bars would drown the driver's display.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def ensure_ray(ray_cfg) -> None:
    if ray.is_initialized():
        return
    address = None if ray_cfg.address in (None, "local") else ray_cfg.address
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = dict(address=address, logging_level=logging.WARNING, log_to_driver=True,
                  runtime_env={"env_vars": WORKER_ENV})
    if address is None:
        kwargs.update(num_cpus=ray_cfg.num_cpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as error:
        raise StageError(f"cannot reach Ray at {ray_cfg.address!r}: {error}") from None
