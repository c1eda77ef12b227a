"""Benchmark: the training loader over WebDataset shards against torchvision's ``ImageFolder`` over
the same JPEGs, with the same timm transform, side by side in one process, one core.

    python -m benchmarks.loader [--images data/demo] [--shards data/shards] [--img-size 64]
                                [--repeats 3] [--cold]

Rows: ``ImageFolder`` (the baseline: shuffled, one file per image), the shard loader
(:func:`pipeline.data.build_train_loader`: sequential shard reads through webdataset's
``tarfile_to_samples``, its shuffle buffer), the same loader reading the tars with the hand-written
USTAR reader it used before (``benchmarks.direct_tar``: the baseline of the webdataset path), and
the shard loader with ``fast_decode`` (:class:`pipeline.data.FastDecode`: the JPEG decoder skips the
resolution the random-resized crop would throw away). Each pass is one epoch of the training
split; best of ``--repeats``. One torch thread and no DataLoader workers: images/s per core, and
the CPU time per image (steadier than the wall clock on a VM with other tenants).

``--cold`` empties the page cache before every pass (needs root: it writes
``/proc/sys/vm/drop_caches``), as when the data set is larger than memory, which ImageNet's 140 GB
is on most machines: then every epoch reads from the disk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import pipeline.data
from benchmarks import direct_tar
from pipeline.data import FastDecode, ShardList, build_train_loader, shard_urls


class _DirectShardList(ShardList):
    """The shard list read by the hand-written reader instead of webdataset's ``tarfile_to_samples``."""

    def samples(self):
        def samples():
            while True:
                yield from direct_tar.read_samples(self.urls)
                if not self.cycle:
                    return

        return samples


@contextlib.contextmanager
def _direct_reader():
    pipeline.data.ShardList = _DirectShardList
    try:
        yield
    finally:
        pipeline.data.ShardList = ShardList


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches: {err}") from None


def _describe(folder: Path) -> str:
    """Typical size of the JPEGs: width x height and kB of the first 50."""
    from PIL import Image

    files = sorted(folder.rglob("*.JPEG"))[:50]
    sizes = [Image.open(f).size for f in files]
    width, height = sorted(w for w, _ in sizes)[len(sizes) // 2], sorted(h for _, h in sizes)[len(sizes) // 2]
    return f"{width}x{height} px, {sum(f.stat().st_size for f in files) / len(files) / 1e3:.0f} kB"


def _rates(loaders: dict, n_images: int, repeats: int, cold: bool) -> dict[str, tuple[float, float]]:
    """Images/s of each loader and its CPU time per image (ms), each the best of ``repeats`` passes;
    the loaders take turns, one pass each per round, so a change in the machine's load hits them
    alike. Each value: (loader, context to run it in). The CPU time (``time.process_time``: every
    thread of this process) is the steadier figure on a shared VM, whose wall clock also counts
    other tenants' time."""
    best = {name: float("inf") for name in loaders}
    cpu = {name: float("inf") for name in loaders}
    for _ in range(repeats):
        for name, (loader, context) in loaders.items():
            if cold:
                drop_page_cache()
            with context():
                tic, tic_cpu = time.perf_counter(), time.process_time()
                for _batch in loader:
                    pass
                best[name] = min(best[name], time.perf_counter() - tic)
                cpu[name] = min(cpu[name], time.process_time() - tic_cpu)
    return {name: (n_images / best[name], cpu[name] / n_images * 1e3) for name in loaders}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, default=Path("data/demo"), help="ImageNet-layout folder")
    p.add_argument(
        "--shards", type=Path, default=Path("data/shards"), help="its shards (stages.shard output)"
    )
    p.add_argument("--img-size", type=int, default=64, help="training resolution")
    p.add_argument("--scale-min", type=float, default=0.35, help="random-resized crop's smallest area")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="empty the page cache before every pass (root)")
    args = p.parse_args()
    torch.set_num_threads(1)

    from timm.data import create_transform

    tf = create_transform(
        args.img_size, is_training=True, scale=(args.scale_min, 1.0), interpolation="bicubic"
    )
    _, count = shard_urls(args.shards, "train")

    def shards(transform):
        loader, steps = build_train_loader(
            args.shards,
            rank=0,
            world_size=1,
            batch_per_rank=args.batch,
            transform=transform,
            seed=0,
            loader_workers=args.workers,
        )
        return loader, steps * args.batch

    folder = DataLoader(
        ImageFolder(args.images / "train", transform=tf),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
    )
    plain, n = shards(tf)
    fast, _ = shards(FastDecode(tf))
    rates = _rates(
        {
            "ImageFolder (baseline)": (folder, contextlib.nullcontext),
            "shards, hand-written tar reader (before)": (plain, _direct_reader),
            "shards, webdataset": (plain, contextlib.nullcontext),
            "shards, webdataset + fast_decode": (fast, contextlib.nullcontext),
        },
        n,
        args.repeats,
        args.cold,
    )
    size = _describe(args.images / "train")
    (base, _), (before, before_cpu) = (
        rates["ImageFolder (baseline)"],
        rates["shards, hand-written tar reader (before)"],
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), "
        f"{args.workers} loader worker(s); {count} training JPEGs of {size}, {args.img_size} px out, "
        f"batch {args.batch}, page cache {'emptied before each pass' if args.cold else 'warm'}"
    )
    print(
        "| loader | images/s | vs ImageFolder | vs hand-written reader "
        "| CPU ms per image | speed by CPU time, vs hand-written reader |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (rate, ms) in rates.items():
        print(
            f"| {name} | {rate:.0f} | {rate / base:.2f}x | {rate / before:.2f}x | {ms:.3f} "
            f"| {before_cpu / ms:.3f}x |"
        )


if __name__ == "__main__":
    main()
