"""Benchmark: the shard stage against a plain single-process ``webdataset.ShardWriter`` loop and a
plain file copy of the same bytes, side by side in one run.

    python -m benchmarks.sharding [--images DIR] [--image-size 224] [--per-class 600] [--workers 2]
                                  [--replicate K]

Without ``--images`` it generates a demo set in ImageNet's layout (``pipeline.demo_data``) in a
temporary folder, at ``--image-size`` so the JPEGs are closer to ImageNet's size than the demo's.
Every method reads the same files from a warm page cache (each timed run first reads them all,
untimed) and writes into a fresh temporary folder on the same disk:

- **copy**: ``shutil.copyfile`` of every file into the same tree, like ``cp -r`` (the rate to
  beat: 90 % of it is the goal);
- **ShardWriter (baseline)**: one process reads each file and writes it with
  ``webdataset.ShardWriter`` (key, ``jpg``, ``cls``), no checks;
- **shard stage**: ``pipeline.shards.write_shards`` with N worker processes, as ``dvc repro``
  runs it: it also checks every JPEG's marker structure (``--verify markers``, the default; or
  ``decode``), hashes every shard, and writes the index and manifest. Its tar members are written
  by ``webdataset.TarWriter``;
- **shard stage, hand-written tar writer**: the same with the USTAR writer the stage used before
  (``benchmarks.direct_tar``, the same bytes): the baseline of the TarWriter path.

Every timed run starts after an ``os.sync()`` and ends with one, so it pays for its own writes
reaching the disk and no one else's. The methods take turns, ``--repeats`` rounds, best of each.
Each timed run is a fresh child process (imports done before the clock starts), so no method
inherits another's state: webdataset imports torch, which starts threads, and the shard stage forks
its workers only from a single-threaded process, as ``python -m stages.shard`` is.

Prints images/s and MB/s (of source JPEG bytes) of each, and the ratios, to the disk (the final
``os.sync()`` included: the rate that counts) and to the page cache (without it: the CPU's side,
steadier on a VM whose disk flushes at a varying rate).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _files(images: Path) -> list[tuple[Path, int]]:
    out = []
    for split in ("train", "val"):
        classes = sorted(p.name for p in (images / split).iterdir() if p.is_dir())
        for label, wnid in enumerate(classes):
            out += [(f, label) for f in sorted((images / split / wnid).iterdir()) if f.is_file()]
    return out


def _copy(files: list[tuple[Path, int]], source: Path, dest: Path) -> None:
    """``cp -r``: the same tree of folders and files, each copied in the kernel (copy_file_range)."""
    for f, _ in files:
        target = dest / f.relative_to(source)
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True)
        shutil.copyfile(f, target)


def _shardwriter(files: list[tuple[Path, int]], dest: Path, maxcount: int) -> None:
    import webdataset as wds

    with wds.ShardWriter(str(dest / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, (f, label) in enumerate(files):
            sink.write({"__key__": f"{i:07d}", "jpg": f.read_bytes(), "cls": label})


def _timed(fn, out: Path) -> tuple[float, float]:
    """Seconds until ``fn`` returns (its writes in the page cache) and until they reached the disk."""
    os.sync()
    tic = time.perf_counter()
    fn(out)
    cached = time.perf_counter() - tic
    os.sync()  # count the writes reaching the disk for every method alike
    return cached, time.perf_counter() - tic


def _child(args: argparse.Namespace) -> None:
    """Time one method once, in this fresh process; print the seconds and the workers' start method."""
    files, started = _files(args.images), []
    for f, _ in files:  # the page cache again: this VM's memory reclaim (DAMON) evicts idle pages
        f.read_bytes()
    if args.one == "copy":
        fn = lambda d: _copy(files, args.images, d)  # noqa: E731
    elif args.one == "shardwriter":
        import webdataset  # noqa: F401 - imported (with torch) before the clock starts

        fn = lambda d: _shardwriter(files, d, args.max_samples_per_shard)  # noqa: E731
    else:
        # The stage's imports, before the clock starts like webdataset's; not pyarrow, which starts
        # threads (the stage imports it once its workers are forked).
        import fsspec  # noqa: F401

        from pipeline import shards

        workers = int(args.one.removeprefix("stage").removesuffix("direct"))
        if args.one.endswith("direct"):  # forked workers inherit the swap
            from benchmarks.direct_tar import DirectTarWriter

            shards.tar_writer = DirectTarWriter

        def fn(d: Path) -> None:
            run = shards.write_shards(
                args.images,
                d,
                max_samples_per_shard=args.max_samples_per_shard,
                workers=workers,
                verify=args.verify,
                show_progress=False,
            )
            started.append(run.started)

    cached, synced = _timed(fn, args.out)
    print(cached, synced, started[0] if started else "-")


def _replicate(images: Path, dest: Path, copies: int) -> Path:
    """``copies`` copies of ``images``' class folders, the k-th named ``<wnid>_<k>``: a set
    ``copies`` times as large, in the same layout. Hard links (no generation, no disk) where the
    scratch folder shares the images' filesystem, else copies."""
    for split in ("train", "val"):
        for folder in sorted(p for p in (images / split).iterdir() if p.is_dir()):
            for k in range(copies):
                target = dest / split / f"{folder.name}_{k}"
                target.mkdir(parents=True)
                for f in folder.iterdir():
                    try:
                        os.link(f, target / f.name)
                    except OSError:  # another filesystem
                        shutil.copyfile(f, target / f.name)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, help="an ImageNet-layout folder (default: generate one)")
    p.add_argument("--image-size", type=int, default=224, help="side of generated images")
    p.add_argument("--per-class", type=int, default=600, help="generated training images per class")
    p.add_argument("--workers", type=int, default=2, help="processes of the shard stage")
    p.add_argument("--max-samples-per-shard", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="rounds of every method; best of each")
    p.add_argument("--verify", choices=["markers", "decode"], default="markers", help="the stage's check")
    p.add_argument(
        "--replicate",
        type=int,
        default=1,
        help="time K hard-linked copies of the set, each under its own class names (K x the images "
        "without K x the generation: fixed costs then weigh as at full scale)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one method in this process
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        _child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-sharding-", dir=".") as tmp:
        scratch = Path(tmp)
        images = args.images
        if images is None:
            from pipeline.demo_data import generate_demo

            images = scratch / "images"
            generate_demo(images, num_classes=10, train_per_class=args.per_class,
                          val_per_class=max(1, args.per_class // 4), image_size=args.image_size, seed=0,
                          show_progress=False)  # fmt: skip
        if args.replicate > 1:
            images = _replicate(images, scratch / "replicated", args.replicate)
        files = _files(images)
        total = sum(f.stat().st_size for f, _ in files)
        runs = {
            f"shard stage, {args.workers} processes": f"stage{args.workers}",
            f"shard stage, {args.workers} processes, hand-written tar writer": f"stage{args.workers}direct",
            "shard stage, 1 process": "stage1",
            "copy (shutil.copyfile)": "copy",
            "ShardWriter, 1 process (baseline)": "shardwriter",
        }
        methods = {name: float("inf") for name in runs}
        cache = {name: float("inf") for name in runs}
        started_by = "-"
        for _ in range(args.repeats):
            for name, one in runs.items():
                out = Path(tempfile.mkdtemp(dir=scratch))
                command = [sys.executable, "-m", "benchmarks.sharding", "--one", one, "--out", str(out),
                           "--images", str(images), "--verify", args.verify,
                           "--max-samples-per-shard", str(args.max_samples_per_shard)]  # fmt: skip
                run = subprocess.run(command, check=True, capture_output=True, text=True)
                cached, seconds, method = run.stdout.split()
                methods[name] = min(methods[name], float(seconds))
                cache[name] = min(cache[name], float(cached))
                started_by = method if one == f"stage{args.workers}" else started_by
                shutil.rmtree(out)

    copy_s = methods["copy (shutil.copyfile)"]
    base_s = methods["ShardWriter, 1 process (baseline)"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{len(files)} JPEGs, {total / 1e6:.1f} MB ({total / len(files) / 1e3:.1f} kB each); "
          f"best of {args.repeats}; verify: {args.verify}; workers started by {started_by}")  # fmt: skip
    base_c, copy_c = cache["ShardWriter, 1 process (baseline)"], cache["copy (shutil.copyfile)"]
    columns = "images/s | MB/s | vs ShardWriter | vs copy"
    print(f"| method | {columns} | to page cache: images/s | vs ShardWriter | vs copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in sorted(methods, key=lambda n: -methods[n]):
        seconds, cached = methods[name], cache[name]
        print(f"| {name} | {len(files) / seconds:.0f} | {total / 1e6 / seconds:.1f} | "
              f"{base_s / seconds:.2f}x | {100 * copy_s / seconds:.0f} % | {len(files) / cached:.0f} | "
              f"{base_c / cached:.2f}x | {100 * copy_c / cached:.0f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
