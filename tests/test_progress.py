"""The live table's progress column: a line a worker posts under its stage's key shows beside that stage."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from pipeline.runner import StageBoard
from stages.progress import ProgressPoster, progress_board


@pytest.mark.ray
def test_a_posted_progress_line_shows_beside_its_stage(ray_session):
    board = StageBoard(Console(width=200, record=True))
    board.progress = progress_board()
    board.start("distill kd_2L (kd)", "key-a")
    board.start("evaluate teacher")
    ProgressPoster("key-a")("[train] epoch 1/2 step 3/7 loss 0.5000")
    ProgressPoster(None)("nobody reads this")  # no key: a stage outside the pipeline posts nothing
    deadline = time.monotonic() + 30
    while "key-a" not in board.lines and time.monotonic() < deadline:
        board.poll()
        time.sleep(0.1)
    board.console.print(board)
    shown = board.console.export_text()
    assert "distill kd_2L (kd)" in shown and "[train] epoch 1/2 step 3/7 loss 0.5000" in shown
    assert "nobody reads this" not in shown
