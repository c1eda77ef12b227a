"""Streaming the WebDataset shards into training and evaluation, the same number of batches per rank.

DDP hangs when one rank runs out of batches before another (a collective waits forever), and
WebDataset's node splitting gives ranks unequal shard counts whenever the shard count does not
divide ``world_size * loader_workers``. Training therefore splits by *consumer* (a rank's loader
worker) with a per-epoch shuffle of the shard list from a shared seed, cycles a consumer's shards
when they run short, and stops every consumer after the same number of full batches. Evaluation
reads every sample exactly once (ranks may see different counts; results are summed with one
all-reduce, which every rank calls exactly once).
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import read_manifest

log = logging.getLogger(__name__)


class SampleError(RuntimeError):
    """A sample in a shard cannot be decoded. The message names the shard and the key."""


def shard_urls(folder: str | Path, split: str) -> tuple[list[str], int]:
    """Absolute shard paths of ``split`` and its sample count, from the manifest."""
    folder = Path(folder)
    entry = read_manifest(folder)["splits"][split]
    return [str(folder / s["name"]) for s in entry["shards"]], int(entry["count"])


def decode_sample(sample: dict[str, Any], transform: Callable) -> tuple[torch.Tensor, int]:
    """JPEG bytes -> transformed RGB tensor, and the class index."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            image = transform(img.convert("RGB"))
        label = int(sample["cls"])
    except Exception as err:  # noqa: BLE001 - PIL raises many types; re-raised with the sample named
        raise SampleError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')}: {err}") from err
    return image, label


class ShardStream(IterableDataset):
    """Samples of a list of shards for one (rank, loader worker) consumer.

    Args:
        urls: every shard of the split.
        rank, world_size: this process's DDP rank and the number of ranks.
        transform: applied to each PIL image.
        batches_per_rank: if set (training), each rank yields exactly this many batches of
            ``batch_size`` samples, spread over its loader workers in whole batches (so no worker
            emits a partial batch), cycling its shards as needed; shards are shuffled per epoch
            with ``seed`` so assignment changes every epoch but agrees across ranks. If None
            (evaluation), each sample of the split is yielded by exactly one consumer, once.
        shuffle_buffer: in-memory sample shuffle (training only).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        transform: Callable,
        batches_per_rank: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 512,
    ) -> None:
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.transform, self.batches_per_rank, self.batch_size = transform, batches_per_rank, batch_size
        self.seed, self.shuffle_buffer, self.epoch, self.skip = seed, shuffle_buffer, 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's shuffle; skip its first batches (resuming mid-epoch) without decoding them."""
        self.epoch, self.skip = epoch, skip_batches

    def _consumer(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds

        consumer, consumers, workers = self._consumer()
        if self.batches_per_rank is None:
            mine = self.urls[consumer::consumers]
            if not mine:  # more consumers than shards: this one has nothing to evaluate
                return
            pipeline = wds.DataPipeline(wds.SimpleShardList(mine), wds.tarfile_to_samples())
            for sample in pipeline:
                yield decode_sample(sample, self.transform)
            return

        urls = list(self.urls)
        random.Random(self.seed * 100_003 + self.epoch).shuffle(urls)
        # Every consumer gets at least one shard, even with fewer shards than consumers.
        mine = [urls[i % len(urls)] for i in range(consumer, max(len(urls), consumers), consumers)]
        worker = consumer % workers
        steps = self.batches_per_rank
        # The DataLoader takes batch i from worker i % workers, so worker w owns batches w, w+W, ...
        owned = steps // workers + (1 if worker < steps % workers else 0)
        skipped = min(owned, self.skip // workers + (1 if worker < self.skip % workers else 0))
        quota = owned * self.batch_size
        rng = random.Random(f"{self.seed}-{self.epoch}-{consumer}")

        def cycle() -> Iterator[dict[str, Any]]:
            while True:
                yield from wds.DataPipeline(wds.SimpleShardList(mine), wds.tarfile_to_samples())

        stream = wds.filters._shuffle(
            cycle(), bufsize=self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng
        )
        for i, sample in zip(range(quota), stream, strict=False):
            if i >= skipped * self.batch_size:
                yield decode_sample(sample, self.transform)


def batches_per_epoch(num_samples: int, world_size: int, batch_per_rank: int) -> int:
    """Full batches each rank runs per epoch (the same on every rank); at least one."""
    return max(1, num_samples // (world_size * batch_per_rank))


def build_train_loader(
    folder: str | Path,
    *,
    rank: int,
    world_size: int,
    batch_per_rank: int,
    transform: Callable,
    seed: int,
    loader_workers: int = 0,
    accumulation: int = 1,
) -> tuple[DataLoader, int]:
    """The training loader and its optimizer steps per epoch (identical on every rank).

    The loader yields ``steps * accumulation`` micro-batches of ``batch_per_rank // accumulation``.
    """
    urls, count = shard_urls(folder, "train")
    steps = batches_per_epoch(count, world_size, batch_per_rank)
    micro = batch_per_rank // accumulation
    dataset = ShardStream(
        urls,
        rank=rank,
        world_size=world_size,
        transform=transform,
        batches_per_rank=steps * accumulation,
        batch_size=micro,
        seed=seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=micro,
        num_workers=loader_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, steps


def build_eval_loader(
    folder: str | Path,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: Callable,
    loader_workers: int = 0,
) -> tuple[DataLoader, int]:
    """The validation loader (every sample once over all ranks) and the split's sample count."""
    urls, count = shard_urls(folder, "val")
    dataset = ShardStream(urls, rank=rank, world_size=world_size, transform=transform)
    workers = min(loader_workers, max(0, math.ceil(len(urls) / world_size)))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers), count


def build_transforms(img_size: int, aug: Any) -> tuple[Callable, Callable]:
    """timm's train and eval transforms for an :class:`~pipeline.config.AugmentConfig`."""
    from timm.data import create_transform

    train = create_transform(
        img_size,
        is_training=True,
        scale=(aug.scale_min, 1.0),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        interpolation=aug.interpolation,
    )
    evaluate = create_transform(
        img_size, is_training=False, crop_pct=aug.crop_pct, interpolation=aug.interpolation
    )
    return train, evaluate
