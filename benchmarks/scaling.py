"""Benchmark: training images/s with 1 and 2 Ray Train workers (DDP over gloo), side by side.

    python -m benchmarks.scaling [--shards data/shards] [--model t2t_vit_7] [--img-size 64] [--epochs 2]

All runs train the same model on the same shards with the same global batch through the
project's own ``fit`` (no MLflow); images/s is the last epoch's, over all workers. Scaling
efficiency = (images/s with N workers) / (N x images/s with 1 worker). A third run gives one
worker both cores as torch threads instead: the alternative to DDP on one small machine. Needs
one free CPU per worker; on a 2-core laptop the 2-worker run has no core left for the driver or
the loader, so expect well under 100 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.shards import read_manifest
from pipeline.train.loop import RunSpec


def _run(spec: RunSpec, workers: int, storage: str, threads: int = 1) -> float:
    from pipeline.train.ray_driver import build_trainer

    train = spec.train.model_copy(
        update={"num_workers": workers, "torch_threads": threads, "cpus_per_worker": threads}
    )
    trainer = build_trainer(
        replace(spec, train=train), name=f"bench-scaling-{workers}x{threads}", storage_path=storage
    )
    return float(trainer.fit().metrics["images_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument("--model", default="t2t_vit_7")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"depth\": 7}'")
    args = p.parse_args()

    import ray

    num_classes = len(read_manifest(args.shards)["classes"])
    train = TrainConfig(img_size=args.img_size, epochs=args.epochs, warmup_epochs=0, cooldown_epochs=0,
                        batch_size=args.batch, lr=1e-3, drop_path_rate=0.0, num_workers=1,
                        augment=AugmentConfig(scale_min=0.35))  # fmt: skip
    spec = RunSpec(variant="bench", model=args.model, train=train, shards=str(args.shards.resolve()),
                   num_classes=num_classes, model_kwargs=json.loads(args.model_kwargs))  # fmt: skip
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        # A fresh storage folder: Ray would otherwise resume a same-named run from an earlier call.
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as storage:
            one = _run(spec, 1, storage)
            two = _run(spec, 2, storage)
            threads = _run(spec, 1, storage, threads=2)
    finally:
        ray.shutdown()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.model} at {args.img_size}px, "
          f"global batch {args.batch}, last of {args.epochs} epochs")  # fmt: skip
    print("| workers x torch threads | images/s | speed-up | scaling efficiency |")
    print("|---|---:|---:|---:|")
    print(f"| 1 x 1 (baseline) | {one:.1f} | 1.00 | 100 % |")
    print(f"| 2 x 1 (DDP, gloo) | {two:.1f} | {two / one:.2f} | {100 * two / (2 * one):.0f} % |")
    print(f"| 1 x 2 (no DDP) | {threads:.1f} | {threads / one:.2f} | {100 * threads / (2 * one):.0f} % |")


if __name__ == "__main__":
    main()
