"""The two image sets of DVT's tuning: the calibration images and the reported images.

``dvt.calibration: train`` (the authors' protocol): a seeded subset of ``dvt.calibration_images``
images of the training split, read with the *evaluation* transform, calibrates; every validation
image is reported. ``dvt.calibration: val``: a seeded subset of that many validation images
calibrates and only the other validation images are reported. Either way no image is in both sets
(the training split and the validation split are disjoint), and the sets depend only on the seed.

Indices count samples in the order the shards list them in the manifest, so a set is the same on
every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.config import DVTConfig
from pipeline.data import decode_sample, read_samples, shard_records, shard_urls
from pipeline.dvt.thresholds import holdout_split
from pipeline.train.progress import bar

__all__ = ["ImageSet", "image_sets", "iter_batches", "predict"]


@dataclass(frozen=True)
class ImageSet:
    """Samples ``indices`` (sorted) of one split of the shards."""

    split: Literal["train", "val"]
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.size)


def image_sets(dvt: DVTConfig, shards: str) -> tuple[ImageSet, ImageSet]:
    """The calibration and reported image sets ``dvt`` asks for.

    Raises:
        ValueError: The split holds fewer images than ``dvt.calibration_images`` (or no image would be
            left to report), naming the key.
    """
    _, val_count = shard_urls(shards, "val")
    if dvt.calibration == "train":
        _, train_count = shard_urls(shards, "train")
        if dvt.calibration_images > train_count:
            raise ValueError(
                f"dvt.calibration_images is {dvt.calibration_images} but the training split holds "
                f"{train_count} images: lower it in params.yaml"
            )
        calib, _ = holdout_split(train_count, dvt.calibration_images, dvt.seed)
        return ImageSet("train", calib), ImageSet("val", np.arange(val_count))
    if dvt.calibration_images >= val_count:
        raise ValueError(
            f"dvt.calibration_images is {dvt.calibration_images} but the validation split holds "
            f"{val_count} images, leaving none to report: lower it, or use dvt.calibration: train"
        )
    calib, reported = holdout_split(val_count, dvt.calibration_images, dvt.seed)
    return ImageSet("val", calib), ImageSet("val", reported)


def iter_batches(
    shards: str, images: ImageSet, transform: Callable, batch_size: int, *, verify_sha256: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The images of ``images`` in index order, decoded with ``transform``, in batches.

    Samples not in the set are skipped without decoding. With ``verify_sha256``
    (``data.shards.verify_sha256``) each shard's sha256 is checked on its first read in this process.
    """
    urls, _ = shard_urls(shards, images.split)
    wanted = images.indices
    position, batch, labels = 0, [], []
    samples = read_samples(urls, shard_records(shards, images.split), verify_sha256=verify_sha256)
    for index, sample in enumerate(samples):
        if position == wanted.size:
            break
        if index != wanted[position]:
            continue
        position += 1
        image, label = decode_sample(sample, transform)
        batch.append(image)
        labels.append(label)
        if len(batch) == batch_size:
            yield torch.stack(batch), torch.tensor(labels)
            batch, labels = [], []
    if batch:
        yield torch.stack(batch), torch.tensor(labels)
    if position != wanted.size:
        raise ValueError(
            f"the {images.split} split's shards hold fewer samples than the manifest counts "
            f"({position} of {wanted.size} wanted found): re-run the shard stage"
        )


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs and labels of a model over batches, in eval mode.

    Returns:
        Probabilities (stages, N, classes) -- one stage for a single-exit model -- and labels (N,).
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for images, target in bar(batches, desc="exits over the images"):  # one line per 30 s in a log
            output = model(images.to(device))
            stages = output if isinstance(output, (list, tuple)) else [output]
            probs.append(torch.stack([s.float().softmax(-1) for s in stages]).cpu().numpy())
            labels.append(target.numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probs, axis=1), np.concatenate(labels)
