"""An ImageNet download to WebDataset tar shards, a JSON manifest and a parquet index: parallel,
deterministic and resumable.

Input: any layout :func:`pipeline.imagenet.scan` accepts. Output, under ``output`` (a local folder
or an fsspec URI such as ``s3://bucket/imagenet-shards``; every write goes through fsspec):

- ``train-000000.tar`` ...: WebDataset shards. A sample holds the image bytes (``.jpg``: an RGB
  JPEG's bytes exactly as read; PNG, CMYK and grayscale files re-encoded once as RGB JPEG, see
  :func:`~pipeline.imagenet.prepare_image`), and its class index (``.cls``): the members timm's and
  webdataset's ImageNet readers expect. The wnid, source path and ``converted_from`` of every sample
  are in ``index.parquet``.
- ``manifest.json``: classes, counts per split (found = written + skipped), every shard with its
  sample count, size and sha256, the skipped files with their reason, the ignored non-image files.
  Written last, and only when every shard is complete: downstream stages depend on it.
- ``index.parquet``: one row per stored sample (split, shard, key, label, wnid, path, bytes,
  converted_from).
- ``manifest.partial.json``: the progress record, rewritten atomically as each shard completes,
  and removed once ``manifest.json`` is written.

Determinism: samples are assigned to shards by a seeded shuffle, shard boundaries are planned from
the listing (and file sizes, when ``max_bytes_per_shard`` is set) before anything is written, and
tar headers carry fixed metadata, so a shard's bytes depend only on its planned samples: the same
input and seed give byte-identical shards whatever the number of worker processes.

Resumption: each shard is written to ``<name>.tar.tmp`` and renamed when complete, then recorded
with its sha256 in the partial manifest. A re-run with the same plan (listing with sizes and
mtimes, seed, shard size) keeps every recorded shard whose sha256 still matches and writes only the
rest; a changed plan removes the stale files and starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.imagenet import (
    JPEG_QUALITY,
    SPLITS,
    VERIFY_MODES,
    BadImage,
    Listing,
    Sample,
    ShardError,
    prepare_image,
    scan,
)
from pipeline.processes import run_in_processes
from pipeline.shard_folder import (
    INDEX,
    INDEX_COLUMNS,
    INFO,
    LOCK_FILE,
    MANIFEST,
    MANIFEST_VERSION,
    OWN_FILES,
    PARTIAL,
    Store,
    index_parquet,
    read_manifest,
    resolve_output,
    timm_info,
)
from pipeline.shard_resume import finished_record, resume
from pipeline.storage import Lease, Location, resolve_location

log = logging.getLogger(__name__)

__all__ = [
    "INDEX",
    "INDEX_COLUMNS",
    "INFO",
    "LOCK_FILE",
    "MANIFEST",
    "MANIFEST_VERSION",
    "OWN_FILES",
    "PARTIAL",
    "ShardError",
    "ShardRun",
    "Store",
    "index_parquet",
    "read_manifest",
    "resolve_output",
    "timm_info",
    "write_shards",
]

#: What a fork server imports once for every shard worker.
PRELOAD = ("pipeline.shards", "PIL.Image", "fsspec", "webdataset")
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its file name, split and samples in order."""

    name: str
    split: str
    samples: tuple[Sample, ...]


@dataclass
class ShardRun:
    """What :func:`write_shards` did.

    Attributes:
        manifest: the manifest it wrote.
        written: shards written by this call.
        reused: shards kept from an earlier, interrupted call (sha256 checked).
        images: images written by this call.
        seconds: wall time of the call.
        started: how the shard writers ran: ``in-process``, or the worker processes' start method
            (``fork`` from a single-threaded process, else ``forkserver``).
    """

    manifest: dict[str, Any]
    written: list[str]
    reused: list[str]
    images: int
    seconds: float
    started: str = "in-process"

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _padded(n: int, unit: int = BLOCK) -> int:
    return -(-n // unit) * unit


def _tar_bytes(s: Sample) -> int:
    """Bytes a verbatim sample takes in a tar: two headers and two block-padded members (``.cls``,
    ``.jpg``)."""
    return 2 * BLOCK + _padded(len(str(s.label))) + _padded(s.size)


def plan_shards(
    samples: dict[str, list[Sample]],
    *,
    seed: int,
    max_samples_per_shard: int,
    max_bytes_per_shard: int | None = None,
) -> list[ShardPlan]:
    """Assign samples to shards: a seeded shuffle per split, cut at the sample and byte limits.

    The byte limit counts tar headers, padding and the end-of-archive record exactly for samples
    stored verbatim, so such a shard never exceeds it (a re-encoded sample may be a little larger
    than its file). A shard always holds at least one sample.
    """
    plans = []
    for split in SPLITS:
        order = list(samples[split])
        random.Random(f"{seed}-{split}").shuffle(order)
        chunks: list[list[Sample]] = []
        size = 0
        for s in order:
            extra = _tar_bytes(s) if max_bytes_per_shard else 0
            # With this sample, plus tar's two end blocks, padded to a whole record: over the limit?
            too_big = max_bytes_per_shard and _padded(size + extra + 2 * BLOCK, RECORD) > max_bytes_per_shard
            if not chunks or len(chunks[-1]) >= max_samples_per_shard or too_big:
                chunks.append([])
                size = 0
            chunks[-1].append(s)
            size += extra
        plans += [ShardPlan(f"{split}-{i:06d}.tar", split, tuple(c)) for i, c in enumerate(chunks)]
    return plans


def _plan_id(listing: Listing, plans: list[ShardPlan], settings: dict[str, Any]) -> str:
    """Identity of a plan: settings, classes, and every shard's files with size and mtime."""
    h = hashlib.sha256(json.dumps([MANIFEST_VERSION, JPEG_QUALITY, settings, listing.wnids]).encode())
    for p in plans:
        h.update(f"\n{p.name}\n".encode())
        for s in p.samples:
            h.update(f"{s.rel}\t{s.size}\t{s.mtime_ns}\t{s.label}\n".encode())
    return h.hexdigest()


class _Digest:
    """A write-only stream that also hashes and counts what passes through it (the shard's sha256 and
    size without reading it back)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)


def tar_writer(stream: Any) -> Any:
    """``webdataset.TarWriter`` on ``stream`` with fixed metadata (mtime 0, mode 0444, no owner names, USTAR):
    the same samples give byte-identical tars on any machine, at any time. Samples are dicts of bytes;
    members are written in sorted suffix order (``.cls``, ``.jpg``)."""
    import webdataset as wds

    writer = wds.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False)
    # USTAR, as the shards have always been written: tarfile's default (PAX) adds an extended header
    # to a name over 100 bytes. (webdataset 1.0.2 takes a format argument but does not pass it on.)
    writer.tarstream.format = tarfile.USTAR_FORMAT
    return writer


@dataclass(frozen=True)
class _Task:
    url: str
    name: str
    samples: tuple[Sample, ...]
    skip_bad: bool
    verify: str


def _write_shard(task: _Task) -> dict[str, Any]:
    """Write one shard to ``<name>.tmp``, rename it, and return its record (runs in a worker)."""
    store = Store(task.url)
    tmp = task.name + ".tmp"
    converted, bad, count = [], [], 0
    with store.open(tmp, "wb") as raw:
        out = _Digest(raw)
        with tar_writer(out) as tar:
            for s in task.samples:
                try:
                    with open(s.path, "rb", buffering=0) as fh:
                        data = fh.read(s.size + 1)  # one read; one byte more shows a file that grew
                    if len(data) != s.size:
                        listed = f"{s.size} bytes when listed"
                        raise ShardError(f"{s.path} changed while sharding ({listed}); re-run")
                    data, kind = prepare_image(data, task.verify)
                except BadImage as err:
                    bad.append({"path": s.rel, "reason": str(err)})
                    continue
                except FileNotFoundError:
                    raise ShardError(f"{s.path} disappeared while sharding; re-run") from None
                except OSError as err:
                    bad.append({"path": s.rel, "reason": f"unreadable: {err.strerror or err}"})
                    continue
                if kind:
                    converted.append([s.key, kind, len(data)])
                tar.write({"__key__": s.key, "cls": str(s.label).encode(), "jpg": data})
                count += 1
    digest, size = out.sha256, out.size
    if bad and not task.skip_bad:
        store.remove(tmp)
        return {"name": task.name, "complete": False, "bad": bad}
    store.move(tmp, task.name)
    return {
        "name": task.name,
        "complete": True,
        "samples": count,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "converted": converted,
        "skipped": bad,
    }


def _portable(path: Path) -> str:
    """``path`` relative to the repository when inside it, else absolute: a copy of the repository
    (``dvc exp run --temp`` or ``--queue``) then writes the same manifest, and its trainings see
    unchanged data."""
    from pipeline.paths import repo_root

    try:
        return Path(path).resolve().relative_to(repo_root()).as_posix()
    except ValueError:
        return str(path)


def _index_and_manifest(
    listing: Listing, plans: list[ShardPlan], records: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in INDEX_COLUMNS}
    splits: dict[str, Any] = {}
    for split in SPLITS:
        mine = [p for p in plans if p.split == split]
        shards, per_class, converted, skipped = [], Counter(), Counter(), []
        for p in mine:
            record = records[p.name]
            gone = {b["path"] for b in record["skipped"]}
            changed = {key: (kind, size) for key, kind, size in record["converted"]}
            skipped += record["skipped"]
            for s in p.samples:
                if s.rel in gone:
                    continue
                kind, size = changed.get(s.key, (None, s.size))
                converted[kind] += kind is not None
                per_class[s.wnid] += 1
                row = (split, p.name, s.key, s.label, s.wnid, s.rel, size, kind)
                for column, value in zip(columns.values(), row, strict=True):
                    column.append(value)
            if record["samples"]:  # a shard whose every sample was skipped would stall a reader
                shards.append({"name": p.name, **{k: record[k] for k in ("samples", "bytes", "sha256")}})
        found, written = len(listing.samples[split]), sum(per_class.values())
        if found != written + len(skipped):  # an invariant: nothing is ever dropped silently
            raise AssertionError(f"{split}: found {found} != written {written} + skipped {len(skipped)}")
        splits[split] = {
            "found": found,
            "written": written,
            "count": written,
            "skipped": sorted(skipped, key=lambda b: b["path"]),
            "converted": {k: v for k, v in sorted(converted.items(), key=lambda kv: str(kv[0])) if k and v},
            "per_class": dict(sorted(per_class.items())),
            "shards": shards,
        }
    index = index_parquet(columns)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": _portable(listing.root),
        "layout": listing.layout,
        **settings,
        "jpeg_quality_of_converted": JPEG_QUALITY,
        "classes": listing.wnids,
        "class_names": listing.class_names,
        "ignored": listing.ignored,
        "bad_files": listing.bad,  # unusable names and symlinks (pipeline.storage.unusable), never read
        "splits": splits,
        "index": {"name": INDEX, "rows": len(columns["key"]), "sha256": hashlib.sha256(index).hexdigest()},
    }
    return index, manifest


def write_shards(
    source: str | Path,
    output: str | Path,
    *,
    max_samples_per_shard: int = 256,
    max_bytes_per_shard: int | None = None,
    seed: int = 0,
    workers: int = 2,
    on_bad_image: Literal["fail", "skip"] = "fail",
    verify: Literal["markers", "decode"] = "markers",
    show_progress: bool = True,
) -> ShardRun:
    """Shard ``source`` into ``output`` (a folder or an fsspec URI), resuming an interrupted run.

    Args:
        source: an ImageNet download in a layout :func:`pipeline.imagenet.scan` accepts.
        output: where the shards, index and manifest go.
        max_samples_per_shard, max_bytes_per_shard: cut a shard at whichever comes first (bytes:
            None for no limit).
        seed: of the sample-to-shard shuffle.
        workers: processes writing shards (0: one per CPU core); the output does not depend on it.
        on_bad_image: ``fail`` names every empty, truncated or undecodable file and writes no
            manifest; ``skip`` leaves them out and lists them, with the reason, in the manifest.
        verify: how an RGB JPEG kept verbatim is checked (:func:`pipeline.imagenet.prepare_image`):
            ``markers`` (its marker structure) or ``decode`` (also a decode at 1/8 scale). Part of
            the plan: changing it re-checks every file.
        show_progress: a tqdm bar with images/s and the time left.

    Raises:
        ShardError: the layout is not recognised (nothing is created), or bad images under ``fail``
            (complete shards are kept for the next run, no manifest is written).
    """
    from tqdm import tqdm

    tic = time.perf_counter()
    if max_samples_per_shard < 1:
        raise ShardError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    if max_bytes_per_shard is not None and max_bytes_per_shard < 1:
        raise ShardError(f"max_bytes_per_shard must be >= 1 or None, got {max_bytes_per_shard}")
    if on_bad_image not in ("fail", "skip"):
        raise ShardError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if verify not in VERIFY_MODES:
        raise ShardError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    workers = workers or os.cpu_count() or 1
    listing = scan(source)  # before the output is touched: a bad layout leaves nothing behind
    settings = {"seed": seed, "max_samples_per_shard": max_samples_per_shard}
    settings["max_bytes_per_shard"] = max_bytes_per_shard
    plans = plan_shards(listing.samples, **settings)
    settings["verify"] = verify
    if listing.ignored:
        log.warning("ignoring %d non-image file(s), listed in the manifest", len(listing.ignored))

    # One run per output: a second one (another stage, another machine) refuses, naming this one.
    # Renewed from this thread after each shard: the process must stay single-threaded to fork workers.
    lease = Lease(
        Location(resolve_location(output)), LOCK_FILE, what=f"sharding into {output}", ttl_s=900, thread=False
    )
    with lease:
        store = Store(output)
        store.makedirs()
        if store.local and not store.exists(".gitignore"):
            # Shards are data: DVC records the manifest's hash in dvc.lock; git should see none of it.
            store.write_atomic(".gitignore", b"# written by pipeline/shards.py: data, tracked by DVC\n*\n")
        finished = finished_record(store, plans, settings)  # a finished folder keeps no progress record
        store.remove(MANIFEST)  # whatever happens next, no manifest until every shard is done
        store.remove(INFO)
        plan_id = _plan_id(listing, plans, settings)
        partial = resume(store, plan_id, plans, workers, finished)
        records = partial["shards"]
        store.write_atomic(PARTIAL, json.dumps(partial, sort_keys=True).encode())
        todo = {p.name: p for p in plans if p.name not in records}
        reused = [p.name for p in plans if p.name in records]
        total, left = sum(len(p.samples) for p in plans), sum(len(p.samples) for p in todo.values())
        log.info(
            "%d images, %d shards (%d complete) into %s, %d worker(s)",
            total,
            len(plans),
            len(reused),
            store.url,
            workers,
        )
        tasks = [_Task(store.url, p.name, p.samples, on_bad_image == "skip", verify) for p in todo.values()]
        bad: list[dict[str, str]] = []
        written, images = [], 0
        results, started = run_in_processes(_write_shard, tasks, workers, PRELOAD)  # before the bar's thread
        if started != "in-process":  # while the workers write: the index's imports (0.15 s)
            import pyarrow.parquet  # noqa: F401
        with tqdm(
            total=total, initial=total - left, unit="img", desc="shard", disable=not show_progress
        ) as bar:
            for result in results:
                name = result.pop("name")
                if result.pop("complete"):
                    records[name] = result
                    written.append(name)
                    images += result["samples"]
                else:
                    bad += result["bad"]
                partial["bad"] = sorted(bad, key=lambda b: b["path"])
                store.write_atomic(PARTIAL, json.dumps(partial, sort_keys=True).encode())
                lease.renew()
                bar.update(len(todo[name].samples))
        if bad:
            listed = "\n".join(f"  {listing.root / b['path']}: {b['reason']}" for b in partial["bad"])
            raise ShardError(
                f"{len(bad)} bad image file(s) in {listing.root} (on_bad_image: fail). Replace or delete "
                "them, or set data.shards.on_bad_image: skip to leave them out, listed in the manifest "
                f"(that keeps the {len(records)} complete shards; changing the files re-plans from "
                f"scratch):\n{listed}"
            )
        index, manifest = _index_and_manifest(listing, plans, records, settings)
        store.write_atomic(INDEX, index)
        store.write_atomic(INFO, (json.dumps(timm_info(manifest), indent=2) + "\n").encode())
        store.write_atomic(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        store.remove(PARTIAL)  # the progress record has served: a finished folder holds no leftovers
        run = ShardRun(manifest, sorted(written), reused, images, time.perf_counter() - tic, started)
        for split, s in manifest["splits"].items():
            summary = (
                f"{s['found']} found, {s['written']} written, {len(s['skipped'])} skipped, {s['converted']}"
            )
            log.info("%s: %s converted", split, summary)
        log.info("wrote %d shard(s), kept %d; %.0f images/s", len(written), len(reused), run.images_per_s)
        return run
