"""An ImageNet-layout folder to WebDataset tar shards, a JSON manifest and a parquet index.

Input: ``<source>/train/<wnid>/*.JPEG`` and ``<source>/val/<wnid>/*.JPEG`` (optional
``LOC_synset_mapping.txt`` for class names). Output, in ``<output>/``:

- ``train-000000.tar`` ...: WebDataset shards. Each sample holds the JPEG bytes exactly as read
  (``.jpg``, never re-encoded), its class index (``.cls``) and ``.json`` with wnid, label and
  source path. Samples are assigned to shards by a seeded shuffle so every shard mixes classes, and
  tar headers carry fixed metadata, so the same input and seed give byte-identical shards.
- ``manifest.json``: counts per split and per class, every shard with its sample count, size and
  sha256. Downstream stages read shard lists and counts from here.
- ``index.parquet``: one row per sample (split, shard, key, label, wnid, source path, bytes).

The folder is written to ``<output>.tmp`` and renamed into place at the end, so an interrupted
run never leaves a half-written shard set that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGE_SUFFIXES = {".jpeg", ".jpg"}
MANIFEST = "manifest.json"
INDEX = "index.parquet"
MANIFEST_VERSION = 1


class ShardError(RuntimeError):
    """The source folder cannot be sharded. The message names the path and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image found in the source folder."""

    path: Path
    rel: str
    wnid: str
    label: int

    @property
    def key(self) -> str:
        # WebDataset splits keys at the first dot, so keys carry no suffix and no dots.
        return Path(self.rel).stem.replace(".", "_")


def scan(source: Path) -> tuple[list[str], dict[str, list[Sample]], list[str]]:
    """Find the classes and images of an ImageNet-layout folder.

    Returns:
        (wnids in label order, samples per split sorted by path, ignored non-image files)

    Raises:
        ShardError: the folder or a split is missing, or val holds a class train does not.
    """
    if not source.is_dir():
        raise ShardError(
            f"data source {source} does not exist (or is not a folder); set data.root "
            "to an ImageNet-layout folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        )
    for split in SPLITS:
        if not (source / split).is_dir():
            raise ShardError(f"{source / split} is missing: expected {source}/{split}/<wnid>/*.JPEG")
    wnids = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    if not wnids:
        raise ShardError(f"{source / 'train'} holds no class folders (expected train/<wnid>/*.JPEG)")
    labels = {w: i for i, w in enumerate(wnids)}
    samples: dict[str, list[Sample]] = {}
    ignored: list[str] = []
    for split in SPLITS:
        found: list[Sample] = []
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            if class_dir.name not in labels:
                raise ShardError(f"{class_dir}: class {class_dir.name} is in {split} but not in train")
            for f in sorted(class_dir.iterdir()):
                rel = str(f.relative_to(source))
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(Sample(f, rel, class_dir.name, labels[class_dir.name]))
                else:
                    ignored.append(rel)
        if not found:
            raise ShardError(f"{source / split} holds no .JPEG images")
        samples[split] = found
    return wnids, samples, ignored


def class_names(source: Path, wnids: list[str]) -> dict[str, str]:
    """wnid -> human name from ``LOC_synset_mapping.txt`` when present, else the wnid itself."""
    mapping = source / "LOC_synset_mapping.txt"
    names = {w: w for w in wnids}
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            if wnid in names:
                names[wnid] = name.strip() or wnid
    return names


def _check_jpeg(data: bytes, sample: Sample) -> None:
    # A cheap structural check (start-of-image marker and a parseable header); full decoding of
    # 1.28 M images here would double the stage's cost. Decoding errors that slip through are
    # named by the loader with the shard and key.
    import io

    from PIL import Image

    if not data:
        raise ShardError(f"{sample.path}: empty file; delete or replace it and re-run")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:  # PIL raises many types for bad files
        raise ShardError(
            f"{sample.path}: not a readable image ({err}); delete or replace it and re-run"
        ) from None


def _write_shard(path: Path, samples: list[Sample], split: str) -> tuple[list[dict[str, Any]], int]:
    import webdataset as wds

    rows = []
    with open(path, "wb") as fh:
        # Fixed mtime/user/group so the same input gives byte-identical tars.
        writer = wds.TarWriter(fh, mtime=0.0, user="", group="")
        try:
            for s in samples:
                data = s.path.read_bytes()
                _check_jpeg(data, s)
                meta = {"wnid": s.wnid, "label": s.label, "path": s.rel}
                writer.write({"__key__": s.key, "jpg": data, "cls": s.label, "json": meta})
                rows.append(
                    {
                        "split": split,
                        "shard": path.name,
                        "key": s.key,
                        "label": s.label,
                        "wnid": s.wnid,
                        "path": s.rel,
                        "bytes": len(data),
                    }
                )
        finally:
            writer.close()
    return rows, path.stat().st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(
    source: str | Path,
    output: str | Path,
    *,
    max_samples_per_shard: int = 256,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Shard ``source`` into ``output`` and return the manifest (also written to ``output``).

    Raises:
        ShardError: bad layout or an unreadable image; nothing is left under ``output``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    source, output = Path(source), Path(output)
    if max_samples_per_shard < 1:
        raise ShardError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    wnids, samples, ignored = scan(source)
    total = sum(len(v) for v in samples.values())
    log.info("sharding %d images of %d classes from %s into %s", total, len(wnids), source, output)
    if ignored:
        log.warning("ignoring %d non-image files (listed in the manifest), e.g. %s", len(ignored), ignored[0])

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "source": str(source.resolve()),
        "seed": seed,
        "max_samples_per_shard": max_samples_per_shard,
        "classes": wnids,
        "class_names": class_names(source, wnids),
        "ignored": ignored,
        "splits": {},
    }
    rows: list[dict[str, Any]] = []
    try:
        with tqdm(total=total, unit="img", desc="shard", disable=not show_progress) as bar:
            for split in SPLITS:
                order = list(samples[split])
                random.Random(f"{seed}-{split}").shuffle(order)
                shards = []
                for i in range(0, len(order), max_samples_per_shard):
                    chunk = order[i : i + max_samples_per_shard]
                    path = tmp / f"{split}-{i // max_samples_per_shard:06d}.tar"
                    shard_rows, size = _write_shard(path, chunk, split)
                    rows.extend(shard_rows)
                    shards.append(
                        {"name": path.name, "samples": len(chunk), "bytes": size, "sha256": _sha256(path)}
                    )
                    bar.update(len(chunk))
                manifest["splits"][split] = {
                    "count": len(order),
                    "per_class": dict(sorted(Counter(s.wnid for s in order).items())),
                    "shards": shards,
                }
        pq.write_table(pa.Table.from_pylist(rows), tmp / INDEX)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    for split in SPLITS:
        s = manifest["splits"][split]
        log.info("%s: %d images in %d shards", split, s["count"], len(s["shards"]))
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load ``<folder>/manifest.json``.

    Raises:
        ShardError: missing or from an incompatible version, naming the file and the fix.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: run the shard stage first (dvc repro shard)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardError(
            f"{path}: manifest version {manifest.get('version')} != {MANIFEST_VERSION}; re-shard"
        )
    return manifest
