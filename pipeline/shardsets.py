"""WebDataset sets this project did not write: the loader reads them as it reads its own shards.

- A folder (or fsspec URI) with timm's ``_info.json``, as sets in timm's layout carry (published
  ImageNet shards): per split, shard file names (brace patterns allowed; a ``pipe:`` or
  ``https://`` name is used as it is) and sample counts; ``val`` is also looked up as
  ``validation``, timm's name for it.
- A local folder of ``<split>-*.tar`` from any WebDataset writer (``webdataset.ShardWriter``),
  counted by reading the tar headers.

Every sample needs a ``.cls`` (class index) and a ``.jpg`` (or ``.jpeg``, ``.png``, ``.webp``).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from pipeline.shards import INFO, ShardError, Store


class ShardSetError(ShardError):
    """A shard set's description is incomplete; the message names the file and what is missing."""


def foreign_urls(store: Store, split: str) -> tuple[list[str], int] | None:
    """``(urls, samples)`` of ``split`` in a set written by others, or None if ``store`` holds none."""
    if store.exists(INFO):
        return info_urls(store, split)
    if store.local:
        tars = sorted(str(p) for p in Path(store.root).glob(f"{split}-*.tar"))
        if tars:
            return tars, count_samples(tars)
    return None


def info_urls(store: Store, split: str) -> tuple[list[str], int]:
    """Shard URLs and sample count of ``split`` from timm's ``_info.json`` in ``store``."""
    from braceexpand import braceexpand

    splits = json.loads(store.read(INFO)).get("splits", {})
    name = split if split in splits else "validation" if split == "val" and "validation" in splits else None
    if name is None:
        raise ShardSetError(f"{store.url_of(INFO)} has no split {split!r} (it lists {sorted(splits)})")
    entry = splits[name]
    names = [n for pattern in entry["filenames"] for n in braceexpand(pattern)]
    urls = [n if n.startswith("pipe:") or "://" in n else store.url_of(n) for n in names]
    count = entry.get("num_samples") or sum(entry.get("shard_lengths", ()))
    if not count:
        raise ShardSetError(f"{store.url_of(INFO)}: split {name!r} has neither num_samples nor shard_lengths")
    return urls, int(count)


def count_samples(tars: list[str]) -> int:
    """Samples (distinct keys) in local tars, from their headers (tarfile seeks past the data)."""
    count = 0
    for path in tars:
        with tarfile.open(path) as tar:
            keys = {_key(m.name) for m in tar if m.isfile() and "." in m.name.rsplit("/", 1)[-1]}
        count += len(keys)
    return count


def _key(name: str) -> str:
    """A member's sample key, as webdataset groups them: the path up to its file name's first dot."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def shards_for_stage(output: str, root: Path) -> str:
    """Where a stage reads ``data.shards.output`` from: resolved against the repository, except in a
    ``dvc exp run --temp/--queue`` copy whose shard stage was restored from DVC's run cache (the
    manifest is an output, the tars are not): then the user's checkout, whose manifest is the same
    bytes, holds the tars."""
    from pipeline.paths import checkout_root, resolve_state
    from pipeline.shards import MANIFEST, resolve_output

    here = resolve_output(output, root)
    checkout = checkout_root(root)
    if "://" in output or checkout == root:
        return here
    there = str(resolve_state(output, root))
    mine, theirs = Path(here) / MANIFEST, Path(there) / MANIFEST
    if not (mine.is_file() and theirs.is_file()) or mine.read_bytes() != theirs.read_bytes():
        return here
    names = [s["name"] for split in json.loads(mine.read_text())["splits"].values() for s in split["shards"]]
    if all((Path(here) / n).is_file() for n in names):
        return here
    return there
