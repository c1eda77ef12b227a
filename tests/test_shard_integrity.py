"""The shard reader trusts nothing it can check: a shard cut at a member boundary, a zeroed block
(where a tar reader stops without error), a shard of the wrong size, and (as an option) changed
bytes are each an error naming the shard; evaluation fails on a sample count that differs from the
manifest. Real shards from the shard stage, damaged on disk; webdataset reads them."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.data import SampleError, build_eval_loader, read_samples, shard_records, shard_urls


@pytest.fixture()
def shards(tiny_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's shards, free to damage."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_intact_shards_read_in_full_with_every_check_on(shards: Path) -> None:
    urls, count = shard_urls(shards, "train")
    assert len(list(read_samples(urls, shard_records(shards, "train")))) == count


def test_a_zeroed_block_is_a_count_mismatch_naming_the_shard(shards: Path) -> None:
    urls, _ = shard_urls(shards, "train")
    victim = Path(urls[0])
    fourth = _members(victim)[3]  # the second sample's first member (three members per sample)
    _patch(victim, fourth.offset, bytes(512))  # tarfile reads a zero block as the end
    expected = shard_records(shards, "train")
    with pytest.raises(SampleError, match=rf"shard {victim} holds 1 samples, its manifest record \d+"):
        list(read_samples(urls, expected))


def test_a_shard_cut_at_a_member_boundary_or_resized_is_named(shards: Path) -> None:
    urls, _ = shard_urls(shards, "train")
    victim = Path(urls[-1])
    cut = _members(victim)[3].offset  # exactly where the second sample starts
    victim.write_bytes(victim.read_bytes()[:cut])
    with pytest.raises(SampleError, match=rf"shard {victim} is {cut} bytes, its manifest record \d+"):
        list(read_samples(urls, shard_records(shards, "train")))
    # Without the manifest, the missing end blocks alone give it away.
    with pytest.raises(SampleError, match=rf"shard {victim} does not end with a tar's two zero blocks"):
        list(read_samples([str(victim)]))


def test_changed_bytes_are_caught_by_the_optional_sha256(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import data

    urls, count = shard_urls(shards, "val")
    victim = Path(urls[0])
    jpg = next(m for m in _members(victim) if m.name.endswith(".jpg"))
    _patch(victim, jpg.offset_data + jpg.size // 2, b"\x00\x11\x22")  # inside the JPEG's data
    expected = shard_records(shards, "val")
    assert len(list(read_samples(urls, expected))) == count, "size, ends and count cannot see it"
    monkeypatch.setenv(data.VERIFY_SHA256_ENV, "1")
    monkeypatch.setattr(data, "_VERIFIED", set())
    with pytest.raises(SampleError, match=rf"shard {victim}: sha256 [0-9a-f]{{64}}, its manifest record"):
        list(read_samples(urls, expected))


def test_evaluation_fails_on_a_count_mismatch_naming_the_shard(shards: Path) -> None:
    urls, _ = shard_urls(shards, "val")
    victim = Path(urls[-1])
    _patch(victim, _members(victim)[3].offset, bytes(512))
    loader, _ = build_eval_loader(
        shards, rank=0, world_size=1, batch_size=4, transform=lambda img: torch.zeros(3, 8, 8)
    )
    with pytest.raises(SampleError, match=rf"shard {victim} holds 1 samples"):
        for _ in loader:
            pass
