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


def test_sharding_benchmark_prints_its_table(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sharding", "--per-class", "3", "--image-size", "32",
         "--repeats", "1", "--max-samples-per-shard", "4", "--replicate", "2"],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "images/s" not in line]
    assert len(rows) == 5 and "workers started by fork" in proc.stdout
    assert "; 80 JPEGs," in proc.stdout  # 10 classes of 3 + 1 images, twice
    assert not list(root.glob("bench-sharding-*"))  # its scratch folder is gone


def test_verify_benchmark_compares_both_checks() -> None:
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "benchmarks.verify", "--count", "10"], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    truncated = [line for line in proc.stdout.splitlines() if "truncated at" in line]
    assert len(truncated) == 3 and all(line.endswith("| 10 / 10 | 10 / 10 |") for line in truncated)


def test_dvt_throughput_benchmark_compares_early_exit_with_both_baselines(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "dvt.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dvt_throughput", "--img-size", "64", "--batch", "16",
         "--threads", "1", "--repeats", "1", "--warmup", "0", "--num-classes", "10",
         "--exits", "0.5", "0.25", "0.25",
         "--model-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}', "--json", str(out), "--cpu-time"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["exit_fractions"] == [0.5, 0.25, 0.25]  # thresholds set on the batch hit the fractions
    assert result["vs_simulate_ideal"] > 1 and all(v > 0 for v in result["images_per_s"].values())
    assert "| simulate-all |" in proc.stdout and "MACs-ideal" in proc.stdout
