"""Benchmark: full against reduced-size JPEG decoding (``train.augment.fast_decode``), decode plus
timm's train and eval transforms, on images from a shard folder, in one process.

    python -m benchmarks.decode [--shards data/shards] [--img-size 32 64 224] [--images 1000] [--repeats 3]

Prints images/s of each path and the ratio fast / full per input size and transform. The gain
depends on how much larger the stored images are than what the transform needs: ImageNet's
(about 400x350 on average, 500x375 typical) at 224 px gain little in training with scale_min 0.08
(only large crops of large images decode smaller) and more at smaller sizes; the demo's 72 px
images gain only at small sizes.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data import build_transforms, read_samples, shard_urls


def _seconds(transform, images: list[bytes], fast: bool) -> float:
    tic = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            transform(img if fast else img.convert("RGB"))
    return time.perf_counter() - tic


def _rates(full, fast, images: list[bytes], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` images/s of both paths, interleaved so that a busy machine slows both alike."""
    best_full = best_fast = float("inf")
    for _ in range(repeats):
        best_full = min(best_full, _seconds(full, images, False))
        best_fast = min(best_fast, _seconds(fast, images, True))
    return len(images) / best_full, len(images) / best_fast


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", default="data/shards", help="a shard folder or URI (stages.shard output)")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--images", type=int, default=1000, help="images to time (read into memory first)")
    p.add_argument("--img-size", type=int, nargs="+", default=[32, 64, 224])
    p.add_argument("--scale-min", type=float, default=0.08, help="random-resized-crop lower scale")
    p.add_argument("--crop-pct", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)

    urls, _ = shard_urls(args.shards, args.split)
    images = []
    for sample in read_samples(urls):
        images.append(sample["jpg"])
        if len(images) >= args.images:
            break
    sizes = [Image.open(io.BytesIO(d)).size for d in images]
    print(
        f"machine: {platform.processor() or platform.machine()}, 1 thread; {len(images)} {args.split} images "
        f"from {Path(str(args.shards)).name}, median {statistics.median(w for w, _ in sizes):.0f}x"
        f"{statistics.median(h for _, h in sizes):.0f} px; best of {args.repeats}"
    )
    print("| img_size | transform | full decode img/s | fast decode img/s | fast / full |")
    print("|---:|---|---:|---:|---:|")
    base = AugmentConfig(scale_min=args.scale_min, crop_pct=args.crop_pct, color_jitter=0.0)
    for size in args.img_size:
        full = build_transforms(size, base)
        fast = build_transforms(size, base.model_copy(update={"fast_decode": True}))
        for name, full_tf, fast_tf in zip(("train", "eval"), full, fast, strict=True):
            slow_rate, fast_rate = _rates(full_tf, fast_tf, images, args.repeats)
            print(f"| {size} | {name} | {slow_rate:.0f} | {fast_rate:.0f} | {fast_rate / slow_rate:.2f} |")


if __name__ == "__main__":
    main()
