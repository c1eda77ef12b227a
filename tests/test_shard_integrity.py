"""The shard reader trusts nothing it can check: a shard cut at a member boundary, a zeroed block
(where a tar reader stops without error), a shard of the wrong size, and (with the param
``data.shards.verify_sha256``) changed bytes are each an error naming the shard; evaluation fails
on a sample count that differs from the manifest. Real shards from the shard stage, damaged on
disk; webdataset reads them."""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_spec

from pipeline.config import parse_config
from pipeline.data import (
    SampleError,
    build_eval_loader,
    build_train_loader,
    read_samples,
    shard_records,
    shard_urls,
)


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
    third = _members(victim)[2]  # the second sample's first member (two members per sample)
    _patch(victim, third.offset, bytes(512))  # tarfile reads a zero block as the end
    expected = shard_records(shards, "train")
    with pytest.raises(SampleError, match=rf"shard {victim} holds 1 samples, its manifest record \d+"):
        list(read_samples(urls, expected))


def test_a_shard_cut_at_a_member_boundary_or_resized_is_named(shards: Path) -> None:
    urls, _ = shard_urls(shards, "train")
    victim = Path(urls[-1])
    cut = _members(victim)[2].offset  # exactly where the second sample starts
    victim.write_bytes(victim.read_bytes()[:cut])
    with pytest.raises(SampleError, match=rf"shard {victim} is {cut} bytes, its manifest record \d+"):
        list(read_samples(urls, shard_records(shards, "train")))
    # Without the manifest, the missing end blocks alone give it away.
    with pytest.raises(SampleError, match=rf"shard {victim} does not end with a tar's two zero blocks"):
        list(read_samples([str(victim)]))


def _sha256_error(victim: Path) -> str:
    return rf"shard {re.escape(str(victim))}: sha256 [0-9a-f]{{64}}, its manifest record [0-9a-f]{{64}}"


def _alter_padding(shard: Path) -> None:
    """Change three bytes of a member's zero padding after the manifest was written: the same size,
    ends, samples and decoded images, so only the sha256 tells."""

    def layout() -> tuple[list[tuple[str, int, int]], int]:
        return [(m.name, m.size, m.offset_data) for m in _members(shard)], shard.stat().st_size

    before, digest = layout(), hashlib.sha256(shard.read_bytes()).hexdigest()
    member = next(m for m in _members(shard) if 0 < m.size % 512 <= 509)
    _patch(shard, member.offset_data + member.size, b"\x01\x02\x03")
    assert layout() == before and hashlib.sha256(shard.read_bytes()).hexdigest() != digest


def test_changed_bytes_are_caught_by_the_optional_sha256(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import data

    urls, count = shard_urls(shards, "val")
    victim = Path(urls[0])
    size = victim.stat().st_size
    jpg = next(m for m in _members(victim) if m.name.endswith(".jpg"))
    _patch(victim, jpg.offset_data + jpg.size // 2, b"\x00\x11\x22")  # inside the JPEG's data
    assert victim.stat().st_size == size
    expected = shard_records(shards, "val")
    assert len(list(read_samples(urls, expected))) == count, "size, ends and count cannot see it"
    monkeypatch.setattr(data, "_VERIFIED", set())
    with pytest.raises(SampleError, match=_sha256_error(victim)):
        list(read_samples(urls, expected, verify_sha256=True))


@pytest.mark.parametrize("verify", [True, False])
def test_the_verify_sha256_param_decides_in_every_reader(
    root: Path, shards: Path, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """``data.shards.verify_sha256`` from a params file, passed the way each stage passes it: the
    train stage's loaders through the RunSpec its Ray Train workers rebuild, tune_dvt's image sets
    and the evaluate stage's loader. On, an altered shard is an error naming it; off, every reader
    reads every sample, the altered shard included."""
    from pipeline import data
    from pipeline.dvt.images import ImageSet, iter_batches
    from pipeline.evaluation import shard_loader
    from pipeline.train.loop import LocalSession, RunSpec, fit

    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert raw["data"]["shards"]["verify_sha256"] is False, "params.yaml spells it out, off"
    raw["data"]["shards"]["verify_sha256"] = verify
    on = parse_config(raw).data.shards.verify_sha256
    assert on is verify

    train_victim, val_victim = Path(shard_urls(shards, "train")[0][0]), Path(shard_urls(shards, "val")[0][0])
    _alter_padding(train_victim)
    _alter_padding(val_victim)
    val_count = shard_urls(shards, "val")[1]
    blank = lambda img: torch.zeros(3, 8, 8)  # noqa: E731 - the pixels do not matter here

    def train_loader() -> None:
        loader, steps = build_train_loader(
            shards, rank=0, world_size=1, batch_per_rank=8, transform=blank, seed=0, verify_sha256=on
        )
        assert sum(1 for _ in loader) == steps

    def fit_on_a_ray_worker() -> None:
        spec = RunSpec.from_dict(replace(tiny_spec(shards, epochs=1), verify_sha256=on).to_dict())
        assert spec.verify_sha256 is on  # what crosses to the Ray Train workers
        assert "val_top1" in fit(spec, LocalSession())

    def tune_dvt() -> None:
        batches = iter_batches(str(shards), ImageSet("val", np.arange(val_count)), blank, 5, verify_sha256=on)
        assert sum(len(labels) for _, labels in batches) == val_count

    def evaluate() -> None:
        loader, count, _ = shard_loader(str(shards), blank, 5, 0, verify_sha256=on)
        assert sum(len(labels) for _, labels in loader) == count == val_count

    readers = [
        (train_loader, train_victim),
        (fit_on_a_ray_worker, train_victim),  # its train loader reads first
        (tune_dvt, val_victim),
        (evaluate, val_victim),
    ]
    for read, victim in readers:
        monkeypatch.setattr(data, "_VERIFIED", set())  # each reader's first read in this process
        if on:
            with pytest.raises(SampleError, match=_sha256_error(victim)):
                read()
        else:
            read()  # every sample, the altered shard's included, and no sha256 error


def test_evaluation_fails_on_a_count_mismatch_naming_the_shard(shards: Path) -> None:
    urls, _ = shard_urls(shards, "val")
    victim = Path(urls[-1])
    _patch(victim, _members(victim)[2].offset, bytes(512))
    loader, _ = build_eval_loader(
        shards, rank=0, world_size=1, batch_size=4, transform=lambda img: torch.zeros(3, 8, 8)
    )
    with pytest.raises(SampleError, match=rf"shard {victim} holds 1 samples"):
        for _ in loader:
            pass
