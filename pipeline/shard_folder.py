"""What a shard folder holds, and how to open it: the file names, the fsspec :class:`Store` over a
local folder or a URI, the parquet index, timm's ``_info.json`` and the manifest reader.

:mod:`pipeline.shards` writes these folders; the loaders (:mod:`pipeline.data`,
:mod:`pipeline.shardsets`), training and evaluation read them through this module.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

from pipeline.imagenet import ShardError

__all__ = [
    "INDEX",
    "INDEX_COLUMNS",
    "INFO",
    "LOCK_FILE",
    "MANIFEST",
    "MANIFEST_VERSION",
    "OWN_FILES",
    "READABLE_VERSIONS",
    "PARTIAL",
    "Store",
    "index_parquet",
    "read_manifest",
    "resolve_output",
    "shard_sha256",
    "timm_info",
]

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
INDEX = "index.parquet"
#: timm's description of a WebDataset folder (``timm.data.create_dataset("wds/...", root=...)``).
INFO = "_info.json"
#: The lease a shard run holds on its output folder (pipeline.storage.Lease: a heartbeat record).
LOCK_FILE = "shard.lock"
#: 3: a sample is ``.cls`` and ``.jpg`` (2 also had a ``.json``, whose fields are all in the index).
MANIFEST_VERSION = 3
#: Manifest versions whose shards this version's readers still read (a 2's ``.json`` is ignored).
READABLE_VERSIONS = (2, 3)
#: Files this module writes into the output folder; only these are ever removed from it.
OWN_FILES = re.compile(
    r"^((train|val)-\d{6}\.tar|manifest\.json|manifest\.partial\.json|index\.parquet|_info\.json)(\.tmp)?$"
)


class Store:
    """The output location through fsspec: a local folder, ``file://``, ``s3://``, ``memory://``...

    ``memory://`` lives in one process: use it with ``workers=1`` (tests).
    """

    def __init__(self, url: str | Path) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        """What a reader opens: a plain path when local, else the URI."""
        return self.path(name) if self.local else f"{self.url.rstrip('/')}/{name}"

    def names(self) -> list[str]:
        if not self.fs.isdir(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def exists(self, name: str) -> bool:
        return self.fs.isfile(self.path(name))

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def open(self, name: str, mode: str = "rb") -> Any:
        return self.fs.open(self.path(name), mode)

    def move(self, src: str, dst: str) -> None:
        self.fs.mv(self.path(src), self.path(dst))

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write ``name.tmp`` and rename it: readers see the old file or the new one, never half."""
        with self.open(name + ".tmp", "wb") as fh:
            fh.write(data)
        self.move(name + ".tmp", name)

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)


def shard_sha256(args: tuple[str, str]) -> tuple[str, str | None]:
    """``(name, sha256)`` of file ``name`` in the folder at URL (None when it is missing), for a pool."""
    url, name = args
    store = Store(url)
    if not store.exists(name):
        return name, None
    digest = hashlib.sha256()
    with store.open(name) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return name, digest.hexdigest()


def resolve_output(output: str, root: Path | None = None) -> str:
    """``data.shards.output`` as a location: a URI unchanged, a path made absolute against the repo."""
    from pipeline.paths import resolve

    return output if "://" in output else str(resolve(output, root))


INDEX_COLUMNS = {  # name: arrow type (pyarrow's name) of index.parquet's columns
    "split": "string",
    "shard": "string",
    "key": "string",
    "label": "int32",
    "wnid": "string",
    "path": "string",
    "bytes": "int64",
    "converted_from": "string",
}


def _arrow_column(values: list[Any], kind: str) -> Any:
    """A pyarrow array built from its buffers. ``pa.array`` would import pandas on first use (0.4 s,
    longer than the index takes to build); this needs no more than pyarrow itself."""
    import pyarrow as pa

    n = len(values)
    validity = None
    if any(v is None for v in values):
        bits = bytearray((n + 7) // 8)
        for i, v in enumerate(values):
            if v is not None:
                bits[i >> 3] |= 1 << (i & 7)
        validity = pa.py_buffer(bytes(bits))
    if kind == "string":
        offsets, data = array.array("i", [0]), bytearray()
        for v in values:
            if v is not None:
                data += v.encode()
            offsets.append(len(data))
        buffers = [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(bytes(data))]
    else:
        typecode = {"int32": "i", "int64": "q"}[kind]
        buffers = [validity, pa.py_buffer(array.array(typecode, [v or 0 for v in values]).tobytes())]
    return pa.Array.from_buffers(getattr(pa, kind)(), n, buffers)


def index_parquet(columns: dict[str, list[Any]]) -> bytes:
    """index.parquet's bytes from its columns (:data:`INDEX_COLUMNS`, in that order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = [_arrow_column(columns[name], kind) for name, kind in INDEX_COLUMNS.items()]
    table = pa.Table.from_arrays(arrays, names=list(INDEX_COLUMNS))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def timm_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """timm's ``_info.json`` for the shards of ``manifest``: per split its shard file names, their
    sample counts and the total, so ``timm.data.create_dataset("wds/<name>", root=<folder>,
    split="train")`` (and timm's ``train.py``) read the folder. ``val`` is also listed as
    ``validation``, the split name timm's ``train.py`` asks for by default."""
    splits = {}
    for split, entry in manifest["splits"].items():
        names = [s["name"] for s in entry["shards"]]
        lengths = [s["samples"] for s in entry["shards"]]
        for alias in (split, "validation") if split == "val" else (split,):
            splits[alias] = {
                "name": alias,
                "num_samples": sum(lengths),
                "filenames": names,
                "shard_lengths": lengths,
            }
    return {"name": "imagenet-shards", "num_classes": len(manifest["classes"]), "splits": splits}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load ``<folder>/manifest.json`` (a local folder or an fsspec URI).

    Raises:
        ShardError: missing or from an incompatible version, naming the file and the fix.
    """
    store = Store(folder)
    if not store.exists(MANIFEST):
        raise ShardError(f"{store.url_of(MANIFEST)} not found: run the shard stage first (dvc repro shard)")
    manifest = json.loads(store.read(MANIFEST))
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ShardError(
            f"{store.url_of(MANIFEST)}: manifest version {manifest.get('version')}, this code reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; re-shard (dvc repro -f -s shard)"
        )
    return manifest
