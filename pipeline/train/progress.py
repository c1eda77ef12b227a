"""What a user watching a long training sees: a line every ``train.log_every_steps`` optimizer steps
(and at least every 30 seconds) with the loss, learning rate, images/s and the time left, logged to
MLflow as well; and progress bars over evaluation passes."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: Longest silence on a long stage, in seconds.
INTERVAL = 30.0


def duration(seconds: float) -> str:
    """``95`` -> ``1 min 35 s``; ``7300`` -> ``2 h 1 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class StepProgress:
    """Rank 0's progress lines and MLflow metrics during training.

    Args:
        variant: named in every line.
        session: the training session; its ``progress(metrics, step)`` (when it has one) gets the
            metrics ``step_loss``, ``step_lr``, ``step_images_per_s``, ``eta_epoch_s``, ``eta_run_s``
            at the global optimizer step.
        rank: only rank 0 reports.
        steps, epochs: optimizer steps per epoch, epochs of the run.
        batch_size: global images per optimizer step.
        every: report every N steps (0: only by time); at least every ``interval`` seconds anyway.
    """

    def __init__(
        self,
        variant: str,
        session: Any,
        *,
        rank: int,
        steps: int,
        epochs: int,
        batch_size: int,
        every: int,
        interval: float = INTERVAL,
    ) -> None:
        self.variant, self.session, self.on = variant, session, rank == 0
        self.steps, self.epochs, self.batch_size = steps, epochs, batch_size
        self.every, self.interval = every, interval
        self.epoch = self.first = 0
        self.tic = self.last = time.perf_counter()
        self.loss_at_last = 0.0
        self.since = 0
        self.lines = 0

    def start_epoch(self, epoch: int, first_step: int) -> None:
        self.epoch, self.first = epoch, first_step
        self.tic = self.last = time.perf_counter()
        self.loss_at_last, self.since = 0.0, 0

    def step(self, done: int, loss_sum: float, lr: float) -> None:
        """After optimizer step ``done`` (1-based within the epoch); ``loss_sum`` is this rank's sum of
        the epoch's step losses so far (the line shows their mean since the last line)."""
        if not self.on:
            return
        self.since += 1
        now = time.perf_counter()
        due = (self.every and done % self.every == 0) or now - self.last >= self.interval
        if not due or done >= self.steps:  # the epoch's own line follows at once
            return
        per_step = (now - self.tic) / max(done - self.first, 1)
        left_epoch = (self.steps - done) * per_step
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.steps * per_step
        metrics = {
            "step_loss": (loss_sum - self.loss_at_last) / self.since,
            "step_lr": lr,
            "step_images_per_s": self.since * self.batch_size / max(now - self.last, 1e-9),
            "eta_epoch_s": left_epoch,
            "eta_run_s": left_run,
        }
        log.info(
            "%s epoch %d/%d step %d/%d: loss %.4g, lr %.3g, %.0f images/s; %s left in the epoch, "
            "%s in the run (training steps)",
            self.variant,
            self.epoch + 1,
            self.epochs,
            done,
            self.steps,
            metrics["step_loss"],
            lr,
            metrics["step_images_per_s"],
            duration(left_epoch),
            duration(left_run),
        )
        report = getattr(self.session, "progress", None)
        if report is not None:
            report(metrics, self.epoch * self.steps + done)
        self.loss_at_last, self.since, self.last = loss_sum, 0, now
        self.lines += 1


def bar(items: Iterable[Any], *, desc: str, total: int | None = None, show: bool = True) -> Iterator[Any]:
    """A tqdm progress bar over ``items`` on stderr: redrawn in place on a terminal; in a log (DVC,
    Ray) one line at most every 30 seconds, plus the last."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return iter(
        tqdm(
            items,
            desc=desc,
            total=total,
            disable=not show,
            mininterval=0.5 if tty else INTERVAL,
            dynamic_ncols=tty,
            file=sys.stderr,
        )
    )
