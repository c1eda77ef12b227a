"""The baseline of the webdataset rows in ``benchmarks.loader`` and ``benchmarks.sharding``: the
hand-written USTAR writer and reader the pipeline used before it moved to webdataset's public API
(``webdataset.TarWriter``, ``tarfile_to_samples``). Kept here only to be measured against; both
write and read the same bytes as the pipeline does.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_ZEROS = bytes(RECORD)


def _padded(n: int, unit: int = BLOCK) -> int:
    return -(-n // unit) * unit


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uname, info.gname = 0, 0o444, "", ""
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    header[148:156] = b" " * 8  # a checksum is computed with its own field as spaces
    return bytes(header)


_HEADER = _template()
_HEADER_SUM, _SIZE_SUM = sum(_HEADER), sum(_HEADER[124:136])


def member(name: str, data: bytes) -> bytes:
    """One regular-file member: a header patched from a template, the data, zero padding."""
    raw = name.encode()
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    else:
        patched = bytearray(_HEADER)
        patched[: len(raw)] = raw
        size = b"%011o\x00" % len(data)
        patched[124:136] = size
        patched[148:155] = b"%06o\x00" % (_HEADER_SUM + sum(raw) + sum(size) - _SIZE_SUM)
        header = bytes(patched)
    return b"".join((header, data, _ZEROS[: _padded(len(data)) - len(data)]))


class DirectTarWriter:
    """What ``pipeline.shards.tar_writer`` returns, written by hand: the same bytes."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.size = stream, 0

    def __enter__(self) -> DirectTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        end = _ZEROS[: 2 * BLOCK] + _ZEROS[: _padded(self.size + 2 * BLOCK, RECORD) - self.size - 2 * BLOCK]
        self.stream.write(end)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        data = b"".join(member(f"{key}.{k}", sample[k]) for k in sorted(sample) if not k.startswith("_"))
        self.stream.write(data)
        self.size += len(data)


def _octal(field: bytes) -> int:
    return int(field.strip(b"\x00 ") or b"0", 8)


def members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file: one header parse and one read per member."""
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header == _ZEROS[:BLOCK]:
            return
        size = _octal(header[124:136])
        name = header[:100].split(b"\x00", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\x00", 1)[0] + b"/" + name
        data = stream.read(size)
        stream.read(-size % BLOCK)
        if header[156:157] in (b"0", b"\x00"):
            yield name.decode(), data


def read_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Samples as webdataset dicts, grouped by the name before the file name's first dot."""
    for url in urls:
        with open(url, "rb") as stream:
            sample: dict[str, Any] = {}
            for name, data in members(stream):
                folder, _, base = name.rpartition("/")
                stem, dot, suffix = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[suffix] = data
            if sample:
                yield sample
