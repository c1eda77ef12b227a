"""Benchmark: decoding + augmenting images from WebDataset shards against reading the same JPEGs
from the ImageNet-layout folder (torchvision ImageFolder), side by side in one process.

    python -m benchmarks.loader [--images data/demo] [--shards data/shards] [--img-size 64] [--repeats 3]

Prints images/s of each path and the ratio shards / folder. Same transform, same batch size,
same number of DataLoader workers; the best of ``--repeats`` passes over the training split.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipeline.data import build_train_loader, shard_urls


def _rate(loader, n_images: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        for _batch in loader:
            pass
        best = min(best, time.perf_counter() - tic)
    return n_images / best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, default=Path("data/demo"), help="ImageNet-layout folder")
    p.add_argument(
        "--shards", type=Path, default=Path("data/shards"), help="its shards (stages.shard output)"
    )
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    from timm.data import create_transform

    tf = create_transform(args.img_size, is_training=True, scale=(0.35, 1.0), interpolation="bicubic")
    _, count = shard_urls(args.shards, "train")
    shards, steps = build_train_loader(
        args.shards,
        rank=0,
        world_size=1,
        batch_per_rank=args.batch,
        transform=tf,
        seed=0,
        loader_workers=args.workers,
    )
    folder = DataLoader(
        ImageFolder(args.images / "train", transform=tf),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
    )
    n = steps * args.batch
    folder_rate = _rate(folder, n, args.repeats)
    shard_rate = _rate(shards, n, args.repeats)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{args.workers} loader worker(s); {count} training images at {args.img_size}px, batch {args.batch}"
    )
    print("| path | images/s | ratio |")
    print("|---|---:|---:|")
    print(f"| folder (ImageFolder, baseline) | {folder_rate:.0f} | 1.00 |")
    print(f"| WebDataset shards | {shard_rate:.0f} | {shard_rate / folder_rate:.2f} |")


if __name__ == "__main__":
    main()
