"""Benchmark: the shard stage against a plain single-process ``webdataset.ShardWriter`` loop and a
plain file copy of the same bytes, side by side in one run.

    python -m benchmarks.sharding [--images DIR] [--image-size 224] [--per-class 120] [--workers 2]

Without ``--images`` it generates a demo set in ImageNet's layout (``pipeline.demo_data``) in a
temporary folder, at ``--image-size`` so the JPEGs are closer to ImageNet's size than the demo's.
Every method reads the same files from a warm page cache (one untimed read first) and writes
into a fresh temporary folder on the same disk:

- **copy**: ``shutil.copyfile`` of every file (the rate to beat: 90 % of it is the goal);
- **ShardWriter (baseline)**: one process reads each file and writes it with
  ``webdataset.ShardWriter`` (key, ``jpg``, ``cls``), no checks;
- **shard stage**: ``pipeline.shards.write_shards`` with N worker processes: it also decodes every
  image at 1/8 scale to catch truncation, hashes every shard and writes the index and manifest.

Prints images/s and MB/s (of source JPEG bytes) of each, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import webdataset as wds


def _files(images: Path) -> list[tuple[Path, int]]:
    out = []
    for split in ("train", "val"):
        classes = sorted(p.name for p in (images / split).iterdir() if p.is_dir())
        for label, wnid in enumerate(classes):
            out += [(f, label) for f in sorted((images / split / wnid).iterdir()) if f.is_file()]
    return out


def _copy(files: list[tuple[Path, int]], dest: Path) -> None:
    for i, (f, _) in enumerate(files):
        shutil.copyfile(f, dest / f"{i:07d}.JPEG")


def _shardwriter(files: list[tuple[Path, int]], dest: Path, maxcount: int) -> None:
    with wds.ShardWriter(str(dest / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, (f, label) in enumerate(files):
            sink.write({"__key__": f"{i:07d}", "jpg": f.read_bytes(), "cls": label})


def _timed(fn, scratch: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=scratch))
    tic = time.perf_counter()
    fn(out)
    os.sync()  # count the writes reaching the disk for every method alike
    elapsed = time.perf_counter() - tic
    shutil.rmtree(out)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, help="an ImageNet-layout folder (default: generate one)")
    p.add_argument("--image-size", type=int, default=224, help="side of generated images")
    p.add_argument("--per-class", type=int, default=120, help="generated training images per class")
    p.add_argument("--workers", type=int, default=2, help="processes of the shard stage")
    p.add_argument("--max-samples-per-shard", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="best of N runs of each method")
    args = p.parse_args()

    from pipeline.shards import write_shards  # imported before any timing, like webdataset

    with tempfile.TemporaryDirectory(prefix="bench-sharding-", dir=".") as tmp:
        scratch = Path(tmp)
        images = args.images
        if images is None:
            from pipeline.demo_data import generate_demo

            images = scratch / "images"
            generate_demo(images, num_classes=10, train_per_class=args.per_class,
                          val_per_class=max(1, args.per_class // 4), image_size=args.image_size, seed=0,
                          show_progress=False)  # fmt: skip
        files = _files(images)
        total = sum(f.stat().st_size for f, _ in files)
        for f, _ in files:  # warm the page cache for every method alike
            f.read_bytes()

        def best(fn) -> float:
            return min(_timed(fn, scratch) for _ in range(args.repeats))

        methods = {
            "copy (shutil.copyfile)": best(lambda d: _copy(files, d)),
            "ShardWriter, 1 process (baseline)": best(
                lambda d: _shardwriter(files, d, args.max_samples_per_shard)
            ),
            "shard stage, 1 process": best(
                lambda d: write_shards(
                    images,
                    d,
                    max_samples_per_shard=args.max_samples_per_shard,
                    workers=1,
                    show_progress=False,
                )  # fmt: skip
            ),
            f"shard stage, {args.workers} processes": best(
                lambda d: write_shards(
                    images,
                    d,
                    max_samples_per_shard=args.max_samples_per_shard,
                    workers=args.workers,
                    show_progress=False,
                )  # fmt: skip
            ),
        }

    copy_s = methods["copy (shutil.copyfile)"]
    base_s = methods["ShardWriter, 1 process (baseline)"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{len(files)} JPEGs, {total / 1e6:.1f} MB ({total / len(files) / 1e3:.1f} kB each); "
          f"best of {args.repeats}")  # fmt: skip
    print("| method | images/s | MB/s | vs ShardWriter | vs copy |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in methods.items():
        print(f"| {name} | {len(files) / seconds:.0f} | {total / 1e6 / seconds:.1f} | "
              f"{base_s / seconds:.2f}x | {100 * copy_s / seconds:.0f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
