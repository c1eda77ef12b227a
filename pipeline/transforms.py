"""Image transforms of the training and evaluation streams (:mod:`pipeline.data`): timm's, built
from an :class:`~pipeline.config.AugmentConfig`, and :class:`FastDecode`, which lets the JPEG
decoder skip the resolution the transform would throw away (``train.augment.fast_decode``,
docs/data.md). Imports nothing beyond timm, torchvision and Pillow.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

__all__ = ["FastDecode", "build_transforms", "dct_scale", "draft", "posterize_zero_bits"]


def dct_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) at which a ``crop_h x crop_w`` region still has at
    least ``out_h x out_w`` pixels, so resizing it to the output never upsamples what full decoding
    would have downsampled."""
    return next((s for s in (8, 4, 2) if crop_h / s >= out_h and crop_w / s >= out_w), 1)


def draft(img: Any, scale: int) -> int:
    """Ask ``img`` (opened, not yet loaded) to decode at ``1/scale``; returns the scale granted.

    Only a JPEG can (libjpeg scales in the DCT domain, skipping most of the inverse DCT and colour
    conversion); anything else, or an image already loaded, is decoded in full and gets 1.
    """
    if scale <= 1 or getattr(img, "format", None) != "JPEG":
        return 1
    width = img.width
    img.draft("RGB", (max(1, img.width // scale), max(1, img.height // scale)))
    return round(width / img.width)  # libjpeg's output is ceil(width / scale) wide


class FastDecode:
    """A timm transform whose first step tells the JPEG decoder how small it may decode.

    - Training (first step a random-resized crop): the crop is drawn on the header's size, then the
      image is decoded at the largest DCT scale at which the crop still has at least the output's
      pixels (:func:`dct_scale`), and the crop box, scaled, is resized to the output in one step.
    - Evaluation (first step a resize of the shorter side to ``img_size / crop_pct``): decoded at
      the largest scale keeping both sides at least that long.

    The result differs from full decoding only by where the downsampling happens (DCT domain, then
    the same filter), never by upsampling. The random draws are the same as the wrapped transform's,
    in the same order. Anything else (not a JPEG, another first step) is decoded in full.
    """

    takes_encoded = True

    def __init__(self, transform: Callable) -> None:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms as T

        self.transform = transform
        steps = list(getattr(transform, "transforms", []))
        first = steps[0] if steps else None
        self.crop = first if isinstance(first, RandomResizedCropAndInterpolation) else None
        self.rest = T.Compose(steps[1:]) if self.crop else None
        size = getattr(first, "size", None) if isinstance(first, T.Resize) else None
        if isinstance(size, (list, tuple)):
            size = size[0] if len(size) == 1 else None  # (h, w) ignores the aspect: no safe draft
        self.min_side = size

    def __call__(self, img: Any) -> Any:
        if self.crop is not None:
            return self.rest(self._crop(img))
        if self.min_side:
            draft(img, dct_scale(img.height, img.width, self.min_side, self.min_side))
            return self.transform(img.convert("RGB"))
        return self.transform(img.convert("RGB"))

    def _crop(self, img: Any) -> Any:
        from torchvision.transforms.functional import pil_modes_mapping

        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        out_h, out_w = self.crop.size
        scale = draft(img, dct_scale(h, w, out_h, out_w))
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return img.convert("RGB").resize((out_w, out_h), pil_modes_mapping[interpolation], box=box)


def posterize_zero_bits(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's ``posterize`` op, with "keep 0 bits" giving the black image it always gave.

    RandAugment's ``inc1`` scaling (``PosterizeIncreasing``) keeps ``4 - int(m / 10 * 4)`` bits, so
    at magnitude 10 (``m9`` plus ``mstd0.5`` noise, about 2 % of draws) it keeps 0. Pillow up to 12
    turned that into a black image, as in the authors' runs; Pillow 13 raises ``ValueError: bits must
    be between or equal to 1 and 8`` and a training run dies on the first such draw.
    """
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        from PIL import Image

        return Image.new(img.mode, img.size)  # every bit masked off: zeros in every band
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _fix_posterize(transform: Any) -> None:
    """Point every posterize op of timm's AutoAugment/RandAugment/AugMix steps in ``transform`` at
    :func:`posterize_zero_bits` (on these instances only; timm's tables are left alone)."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))
        for sub in getattr(step, "policy", []):  # AutoAugment: a list of sub-policies
            ops.extend(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_zero_bits


def build_transforms(img_size: int, aug: Any) -> tuple[Callable, Callable]:
    """timm's train and eval transforms for an :class:`~pipeline.config.AugmentConfig`, wrapped in
    :class:`FastDecode` when ``aug.fast_decode`` is set. Posterize keeps the pre-Pillow-13
    behaviour at 0 bits (:func:`posterize_zero_bits`)."""
    from timm.data import create_transform

    train = create_transform(
        img_size,
        is_training=True,
        scale=(aug.scale_min, 1.0),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        re_mode=aug.re_mode,
        interpolation=aug.train_interpolation or aug.interpolation,
    )
    evaluate = create_transform(
        img_size, is_training=False, crop_pct=aug.crop_pct, interpolation=aug.interpolation
    )
    _fix_posterize(train)
    if getattr(aug, "fast_decode", False):
        return FastDecode(train), FastDecode(evaluate)
    return train, evaluate
