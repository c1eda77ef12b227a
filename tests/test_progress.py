"""Progress a user can watch: a line and MLflow metrics every N steps (and at least every 30 s), with
the time left; a progress bar over evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.train.progress import StepProgress, duration


def test_duration_reads_like_a_clock() -> None:
    assert [duration(s) for s in (0, 59.4, 95, 3599, 7300)] == ["0 s", "59 s", "1 min 35 s", "59 min 59 s",
                                                                "2 h 1 min"]  # fmt: skip


class _Session:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def progress(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def test_every_n_steps_with_loss_lr_rate_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    session = _Session()
    progress = StepProgress("v", session, rank=0, steps=10, epochs=3, batch_size=8, every=4, interval=1e9)
    with caplog.at_level(logging.INFO, logger="pipeline.train.progress"):
        for epoch in range(2):
            progress.start_epoch(epoch, 0)
            for done in range(1, 11):
                progress.step(done, loss_sum=done * (done + 1) / 2, lr=0.1)  # step losses 1, 2, 3...
    # Steps 4 and 8 of each epoch (10 is the epoch's own line), at the global step.
    assert [step for step, _ in session.logged] == [4, 8, 14, 18]
    first, second = session.logged[0][1], session.logged[1][1]
    assert first["step_loss"] == pytest.approx((1 + 2 + 3 + 4) / 4)  # the mean since the last line
    assert second["step_loss"] == pytest.approx((5 + 6 + 7 + 8) / 4) and first["step_lr"] == 0.1
    assert first["step_images_per_s"] > 0
    assert 0 <= first["eta_epoch_s"] <= first["eta_run_s"]
    assert session.logged[-1][1]["eta_run_s"] >= session.logged[-1][1]["eta_epoch_s"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[0].startswith("v epoch 1/3 step 4/10: loss 2.5, lr 0.1")
    assert "left in the epoch" in lines[0] and "in the run" in lines[0]


def test_a_line_at_least_every_interval_and_only_on_rank_0() -> None:
    quiet, often = _Session(), _Session()
    StepProgress("v", quiet, rank=1, steps=5, epochs=1, batch_size=8, every=1).step(1, 1.0, 0.1)
    assert quiet.logged == []
    progress = StepProgress("v", often, rank=0, steps=5, epochs=1, batch_size=8, every=0, interval=0.0)
    for done in range(1, 6):
        progress.step(done, 1.0, 0.1)
    assert [step for step, _ in often.logged] == [1, 2, 3, 4]


def test_fit_reports_progress_and_shows_an_evaluation_bar(tiny_shards: Path, capsys) -> None:
    from helpers import tiny_spec

    from pipeline.train.loop import LocalSession, fit

    session = LocalSession()
    fit(tiny_spec(tiny_shards, epochs=2, log_every_steps=2), session)  # 48 images / 8 = 6 steps per epoch
    assert [step for step, _ in session.progress_log] == [2, 4, 8, 10]
    assert "evaluate" in capsys.readouterr().err
