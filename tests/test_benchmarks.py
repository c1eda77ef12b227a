"""Smoke tests of the benchmark code paths that a CPU can run (the numbers belong in benchmarks)."""

from __future__ import annotations

import math

import torch


def test_gpu_mfu_benchmark_runs_its_loop_on_cpu() -> None:
    from benchmarks.gpu_mfu import matmul_peak, train_rate

    assert matmul_peak(torch.device("cpu"), torch.float32, n=64, repeats=2) > 0
    rate = train_rate("t2t_vit_7", img_size=32, batch=2, steps=1, warmup=1, device=torch.device("cpu"),
                      channels_last=True)  # fmt: skip
    assert math.isfinite(rate) and rate > 0
