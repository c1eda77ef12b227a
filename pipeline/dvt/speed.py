"""Measured throughput of DVT: batched early exit, the authors' simulate-all, and a static backbone.

All three run on the same batch, on the same device, in eval mode under ``torch.inference_mode``:

* **early exit** (:func:`~pipeline.dvt.inference.early_exit`): a sample leaves at the first stage
  confident enough; later stages run only on the samples left;
* **simulate-all**: every stage on every image, the exits applied afterwards -- what the authors'
  inference code does, so its speed is what their code can show;
* **static**: the backbone of the same family, one forward pass.

Timing: ``warmup`` untimed calls, then ``repeats`` timed calls, each synchronised on CUDA; the median
is kept. Used by the ``tune_dvt`` stage (:mod:`pipeline.dvt.study`) and by ``benchmarks/dvt_throughput.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.dvt.inference import early_exit
from pipeline.models.dvt import DynamicVisionTransformer

__all__ = ["device_name", "median_seconds", "time_early_exit", "time_simulate_all", "time_static"]


def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's, or the CPU's with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return (
        f"CPU {platform.machine()} ({platform.processor() or 'unknown'}), {torch.get_num_threads()} threads"
    )


#: The clock timings read: wall time. ``time.thread_time`` instead counts only the calling thread's CPU
#: time (with one torch thread, the work done, not the waits for a busy core): set by
#: ``benchmarks/dvt_throughput.py --cpu-time``.
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median time (:data:`CLOCK`, wall time by default) of ``fn()`` over ``repeats`` calls after
    ``warmup`` untimed ones."""
    clock = CLOCK[0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            tic = clock()
            fn()
            sync()
            times.append(clock() - tic)
    return statistics.median(times)


def time_early_exit(
    model: DynamicVisionTransformer,
    images: torch.Tensor,
    thresholds: Sequence[float],
    stage_macs: Sequence[float],
    warmup: int,
    repeats: int,
) -> float:
    """Images/s of batched early exit on ``images``."""
    seconds = median_seconds(
        lambda: early_exit(model, images, thresholds, stage_macs), images.device, warmup, repeats
    )
    return images.shape[0] / seconds


def time_simulate_all(
    model: DynamicVisionTransformer,
    images: torch.Tensor,
    thresholds: Sequence[float],
    warmup: int,
    repeats: int,
) -> float:
    """Images/s of running every stage on every image and applying the exits afterwards."""
    eta = torch.tensor([float(t) for t in thresholds[: model.num_exits - 1]], dtype=torch.float64)

    def run() -> torch.Tensor:
        logits = torch.stack(model(images))
        confidence, prediction = logits.float().softmax(-1).max(-1)
        leaves = confidence[:-1].double().cpu() >= eta[:, None]
        exits = torch.cat([leaves, torch.ones_like(leaves[:1])]).int().argmax(0)
        return prediction.cpu().gather(0, exits[None])[0]

    was_training = model.training
    model.eval()
    try:
        seconds = median_seconds(run, images.device, warmup, repeats)
    finally:
        model.train(was_training)
    return images.shape[0] / seconds


def time_static(model: torch.nn.Module, images: torch.Tensor, warmup: int, repeats: int) -> float:
    """Images/s of one forward pass of a single-exit model."""
    was_training = model.training
    model.eval()
    try:
        seconds = median_seconds(lambda: model(images).argmax(-1), images.device, warmup, repeats)
    finally:
        model.train(was_training)
    return images.shape[0] / seconds
