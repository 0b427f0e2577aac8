"""Where a training stage stands, for the driver's live table of stages: each Ray Train worker of rank 0 posts its
latest progress line ("epoch 1/3 step 120/265") under its stage's key to one named actor, which the driver reads.

Posting is fire-and-forget and optional: without the actor (a stage run outside the pipeline) nothing is posted,
and a lost update only leaves the table a step behind.
"""

from __future__ import annotations

import ray

BOARD_NAME = "kd-stage-progress"


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self.lines: dict[str, str] = {}

    def post(self, key: str, line: str) -> None:
        self.lines[key] = line

    def read(self) -> dict[str, str]:
        return dict(self.lines)


def progress_board():
    """The run's board, made on first use. It lives as long as the driver's job (a named actor in the job's
    namespace), so a cluster keeps no board of a finished run."""
    return ProgressBoard.options(name=BOARD_NAME, get_if_exists=True).remote()


class ProgressPoster:
    """Posts a stage's progress lines, when the board exists; made inside the worker."""

    def __init__(self, key: str | None):
        self.key = key
        self._board = None
        if key is not None:
            try:
                self._board = ray.get_actor(BOARD_NAME)
            except ValueError:  # no board: a stage run outside the pipeline
                self._board = None

    def __call__(self, line: str) -> None:
        if self._board is not None:
            self._board.post.remote(self.key, line)
