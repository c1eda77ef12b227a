"""The shard loader: the same number of batches on every rank and worker, every val sample once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision.transforms import functional as TF

from pipeline.data import build_eval_loader, build_train_loader, shard_urls


def _to_tensor(img):
    return TF.to_tensor(img.resize((16, 16)))


@pytest.mark.parametrize("world,loader_workers", [(1, 0), (2, 0), (3, 0), (2, 2), (3, 2)])
def test_every_rank_gets_the_same_number_of_full_batches(
    tiny_shards: Path, world: int, loader_workers: int
) -> None:
    urls, count = shard_urls(tiny_shards, "train")
    assert len(urls) % (world * max(1, loader_workers)) or world == 1  # uneven splits are the point
    counts = []
    for rank in range(world):
        loader, steps = build_train_loader(
            tiny_shards,
            rank=rank,
            world_size=world,
            batch_per_rank=4,
            transform=_to_tensor,
            seed=0,
            loader_workers=loader_workers,
        )
        batches = list(loader)
        assert all(b[0].shape == (4, 3, 16, 16) for b in batches)
        counts.append(len(batches))
        assert len(batches) == steps == count // (world * 4)
    assert len(set(counts)) == 1


def test_epochs_reshuffle_but_agree_across_runs(tiny_shards: Path) -> None:
    def labels(epoch: int) -> list[int]:
        loader, _ = build_train_loader(
            tiny_shards, rank=0, world_size=1, batch_per_rank=4, transform=_to_tensor, seed=7
        )
        loader.dataset.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert labels(0) == labels(0)
    assert labels(0) != labels(1)


@pytest.mark.parametrize("world,loader_workers", [(1, 0), (2, 0), (3, 2)])
def test_eval_sees_every_sample_exactly_once(tiny_shards: Path, world: int, loader_workers: int) -> None:
    seen: Counter = Counter()
    total = 0
    for rank in range(world):
        loader, count = build_eval_loader(
            tiny_shards,
            rank=rank,
            world_size=world,
            batch_size=3,
            transform=_to_tensor,
            loader_workers=loader_workers,
        )
        for _, y in loader:
            seen.update(y.tolist())
            total += len(y)
    assert total == count == 16
    assert set(seen.values()) == {4}
