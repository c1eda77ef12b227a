"""A synthetic image-classification data set in ImageNet's folder layout, generated from a seed.

The study must run end to end on a laptop with nothing downloaded, so the ``demo`` stage writes a
small stand-in for ImageNet: ``train/<wnid>/<wnid>_<n>.JPEG``, ``val/<wnid>/<wnid>_<n>.JPEG`` and a
``LOC_synset_mapping.txt``, read by the same sharding code as the real thing.

Each class is a visual concept, a combination of factors shared with other classes: a *shape*
(circle, ring, cross, bars, triangle, square, star, crescent), a *colour family* (a band of hues) and,
for more than 48 classes, a *fill texture* (plain, striped, dotted). The default 10 classes are
5 shapes x 2 colour families, so neither mean colour nor shape alone separates them. Every shape is
mirror-symmetric about its upright axis and its position jitters, so random-resized crops and
horizontal flips keep the label.

Each image draws a difficulty ``d`` in [0, 1) that makes it harder in many ways at once (with
strength ``d**1.5``): a smaller, less saturated object, further from the centre and further from
upright (within 15 degrees when easy, any rotation when hard); busier background texture; more
distractors (smaller look-alikes of *other* classes in other colour families, so the model must find
the main object); more blur and noise; and, above d = 0.45, a chance of a bar occluding the object.
Easy and hard images are therefore both present, which the dynamic early-exit model (DVT) needs to
show its trade-off; :func:`difficulty` recomputes ``d`` of any image from its identity.

Calibration (defaults: 2,000 train / 500 val images, 10 classes; chance is 10 %): timm's
``vit_tiny_patch16_224`` at ``img_size=64, patch_size=8, depth=4`` trained from scratch for 15 epochs
(batch 64, AdamW lr 1e-3 wd 0.05, 1 warm-up epoch then cosine, random-resized crop 64 at scale
(0.35, 1) and horizontal flips; centre crop for validation) reaches 48-61 % val top-1 over three
runs (data seeds 0 and 1, training seeds 0 and 1), with 60-85 % on the easiest third of the images,
52-67 % on the middle third and 32-38 % on the hardest third.

Every image is seeded from ``(seed, split, class, index)``, so the bytes do not depend on the order
of generation: the same arguments give byte-identical files (with the same NumPy and Pillow builds;
another JPEG encoder may round differently).
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

log = logging.getLogger(__name__)

#: Bump when the rendering changes, so cached data sets can be told apart.
GENERATOR_VERSION = 1

#: Ordered most distinct first (solid, hollow, thin-armed, two-part, cornered), since a default data set
#: uses only the first five.
SHAPES = ("circle", "ring", "cross", "bars", "triangle", "square", "star", "crescent")
TEXTURES = ("plain", "striped", "dotted")
HUE_NAMES = (
    "red",
    "orange",
    "yellow",
    "lime",
    "green",
    "spring",
    "cyan",
    "azure",
    "blue",
    "violet",
    "magenta",
    "rose",
)
#: Colour families before a texture is added as a third factor.
MAX_FAMILIES_PLAIN = 6
SPLIT_IDS = {"train": 0, "val": 1}
#: Nuisances grow as difficulty**HARDNESS_POWER: the easier half stays clean enough for a small ViT
#: to learn the shapes from, the hardest tail is still hard.
HARDNESS_POWER = 1.5

Split = Literal["train", "val"]


@dataclass(frozen=True)
class ClassSpec:
    """What one class looks like.

    Attributes:
        wnid: ImageNet-style id, ``n`` and 8 digits; sorted order is class-index order.
        name: human-readable name written to ``LOC_synset_mapping.txt``.
        shape: index into :data:`SHAPES`.
        hue: centre of the colour family, in turns (0..1); None when all classes share one family.
        hue_width: half-width of the colour family, in turns.
        texture: index into :data:`TEXTURES`.
        family: index of the colour family.
    """

    wnid: str
    name: str
    shape: int
    hue: float | None
    hue_width: float
    texture: int
    family: int


def wnid(class_index: int) -> str:
    """The wnid of a class: ``n9`` followed by 7 digits, outside WordNet's noun range, so never real."""
    return f"n{90_000_000 + class_index:08d}"


def class_specs(num_classes: int) -> list[ClassSpec]:
    """The factor combination of every class, enumerated shape-fastest.

    Up to 16 classes use ``ceil(C / 2)`` shapes so every shape appears in two colour families; beyond
    that all 8 shapes, then up to 6 colour families, then textures, then narrower colour families.
    """
    n_shapes = min(len(SHAPES), max(2, math.ceil(num_classes / 2)))
    rest = math.ceil(num_classes / n_shapes)
    n_textures = 1 if rest <= MAX_FAMILIES_PLAIN else min(len(TEXTURES), math.ceil(rest / MAX_FAMILIES_PLAIN))
    n_families = math.ceil(rest / n_textures)
    specs = []
    for i in range(num_classes):
        shape, family, texture = i % n_shapes, (i // n_shapes) % n_families, i // (n_shapes * n_families)
        if n_families == 1:
            hue, fam_name = None, ""
        else:
            hue = (1 / 12 + family / n_families) % 1.0
            if n_families == 2:
                fam_name = ("warm", "cool")[family]
            elif n_families <= 12:
                fam_name = HUE_NAMES[round(hue * 12) % 12]
            else:
                fam_name = f"hue{round(hue * 360):03d}"
        words = [fam_name, TEXTURES[texture] if n_textures > 1 and texture else "", SHAPES[shape]]
        specs.append(
            ClassSpec(
                wnid=wnid(i),
                name=" ".join(w for w in words if w),
                shape=shape,
                hue=hue,
                hue_width=0.3 / n_families,
                texture=texture,
                family=family,
            )
        )
    return specs


def _rng(seed: int, split: Split, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], class_index, index])


def difficulty(*, seed: int, split: Split, class_index: int, index: int) -> float:
    """The difficulty in [0, 1) of one image (0 easiest), without rendering it.

    It is the first draw of the image's generator, so it matches what :func:`render_image` used.
    """
    return float(_rng(seed, split, class_index, index).random())


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    qu, qv = np.abs(u) - a, np.abs(v) - b
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to a shape of radius about 1, centred at the origin.

    Exact or a close under-estimate, which is all the one-pixel anti-aliasing needs.
    """
    if shape == "circle":
        return np.hypot(u, v) - 0.85
    if shape == "square":
        return _box(u, v, 0.72, 0.72)
    if shape == "triangle":
        k = math.sqrt(3) / 2
        return np.maximum(np.maximum(-v, k * u + 0.5 * v), -k * u + 0.5 * v) - 0.55
    if shape == "cross":
        return np.minimum(_box(u, v, 0.95, 0.28), _box(u, v, 0.28, 0.95))
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.22
    if shape == "star":
        # Fold into the half-sector between a point (angle 0, one pointing up) and the next notch,
        # then take the distance to the straight edge joining them.
        rho, theta = np.hypot(u, v), np.arctan2(v, u) + math.pi / 2
        phi = np.abs((theta + math.pi / 5) % (2 * math.pi / 5) - math.pi / 5)
        tip, notch = (1.0, 0.0), (0.45 * math.cos(math.pi / 5), 0.45 * math.sin(math.pi / 5))
        ex, ey = notch[0] - tip[0], notch[1] - tip[1]
        norm = math.hypot(ex, ey)
        return ((rho * np.cos(phi) - tip[0]) * ey - rho * np.sin(phi) * ex) / norm
    if shape == "bars":
        return np.minimum(_box(u - 0.45, v, 0.2, 0.9), _box(u + 0.45, v, 0.2, 0.9))
    if shape == "crescent":
        return np.maximum(np.hypot(u, v) - 0.9, 0.72 - np.hypot(u, v + 0.5))  # horns up
    raise ValueError(f"unknown shape {shape!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _family_hue(rng: np.random.Generator, spec: ClassSpec) -> float:
    if spec.hue is None:
        return float(rng.random())
    return spec.hue + rng.uniform(-spec.hue_width, spec.hue_width)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    a = alpha[..., None]
    img *= 1 - a
    img += a * colour


def _draw_shape(
    img: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    colour: np.ndarray,
    texture: int = 0,
) -> None:
    """Paint one anti-aliased shape rotated by ``angle`` radians, its fill plain, striped or dotted."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u, v = c * dx + s * dy, -s * dx + c * dy
    alpha = np.clip(0.5 - _sdf(shape, u, v) * radius, 0, 1)
    if texture == 0:
        _paint(img, alpha, colour)
        return
    period = 0.45  # in object radii, so the pattern scales with the object
    if texture == 1:
        wave = np.sin(u * (2 * math.pi / period))
    else:
        wave = np.sin(u * (2 * math.pi / period)) * np.sin(v * (2 * math.pi / period)) - 0.35
    on = np.clip(0.5 + 2 * wave, 0, 1)  # soft edges, against aliasing
    _paint(img, alpha, colour * 0.35)
    _paint(img, alpha * on, colour)


def distractor_classes(spec: ClassSpec, specs: list[ClassSpec]) -> list[ClassSpec]:
    """Classes whose look-alikes may clutter an image of ``spec``: other shapes, other colours if any."""
    other_shape = [o for o in specs if o.shape != spec.shape]
    return [o for o in other_shape if o.family != spec.family] or other_shape


def render_image(
    spec: ClassSpec,
    distractors: list[ClassSpec],
    *,
    seed: int,
    split: Split,
    class_index: int,
    index: int,
    image_size: int,
) -> Image.Image:
    """Draw one image of class ``spec``, cluttered with smaller look-alikes of ``distractors``.

    Returns:
        an RGB PIL image of ``image_size`` x ``image_size`` pixels.
    """
    rng = _rng(seed, split, class_index, index)
    d = float(rng.random())  # first draw: difficulty() relies on it
    h = d**HARDNESS_POWER  # how strongly every nuisance applies
    n = image_size
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5

    # Background: a low-saturation gradient, busier (sinusoidal texture) on harder images.
    c0 = _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.25, 0.85))
    c1 = _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.25, 0.85))
    g = rng.uniform(0, 2 * math.pi)
    t = np.clip(((xs - n / 2) * math.cos(g) + (ys - n / 2) * math.sin(g)) / n + 0.5, 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    for _ in range(2):
        f, phi, amp = rng.uniform(2, 9) / n, rng.uniform(0, 2 * math.pi), h * rng.uniform(0, 60)
        ang = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * f * (xs * math.cos(ang) + ys * math.sin(ang)) + phi)
        img = img + (amp * wave)[..., None] * rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    img = img.astype(np.float32)

    # The object: large and centred when easy, small and anywhere when hard.
    radius = n * _lerp(0.36, 0.15, h) * rng.uniform(0.9, 1.1)
    reach = min(n * _lerp(0.04, 0.25, h), n / 2 - radius * 0.9)
    # Upright when easy (every shape is then mirror-symmetric about the vertical), any pose when hard.
    angle = rng.uniform(-1, 1) * _lerp(math.pi / 12, math.pi, h)
    cx, cy = n / 2 + rng.uniform(-reach, reach, size=2)
    colour = _hsv(
        _family_hue(rng, spec), rng.uniform(_lerp(0.8, 0.35, h), 1.0), rng.uniform(_lerp(0.8, 0.45, h), 1.0)
    )

    # Distractors: smaller look-alikes of other classes, drawn behind the object.
    for _ in range(rng.binomial(5, 0.8 * h)):
        other = distractors[rng.integers(len(distractors))]
        _draw_shape(
            img,
            xs,
            ys,
            shape=SHAPES[other.shape],
            cx=rng.uniform(0, n),
            cy=rng.uniform(0, n),
            radius=radius * rng.uniform(0.3, 0.6),
            angle=rng.uniform(0, 2 * math.pi),
            texture=other.texture,
            colour=_hsv(_family_hue(rng, other), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)),
        )
    _draw_shape(
        img,
        xs,
        ys,
        shape=SHAPES[spec.shape],
        cx=cx,
        cy=cy,
        radius=radius,
        angle=angle,
        colour=colour,
        texture=spec.texture,
    )

    # Occlusion: a bar in a background colour across part of the object.
    if rng.random() < max(0.0, h - 0.3) * 1.2:
        ang, off = rng.uniform(0, math.pi), rng.uniform(-0.7, 0.7) * radius
        dist = (xs - cx) * math.cos(ang) + (ys - cy) * math.sin(ang) - off
        _paint(img, np.clip(0.5 + radius * rng.uniform(0.12, 0.3) - np.abs(dist), 0, 1), c0)

    blur = h * rng.uniform(0, 1.5)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * _lerp(2, 28, h)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it; ``dst`` is never half-written, only briefly absent."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def generate_demo(
    out_dir: Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 200,
    val_per_class: int = 50,
    image_size: int = 72,
    seed: int = 0,
    jpeg_quality: int = 90,
    show_progress: bool = True,
) -> dict:
    """Write the demo data set to ``out_dir`` in ImageNet's folder layout, replacing what was there.

    The images are rendered into ``<out_dir>.tmp`` (an earlier partial one is removed first), which
    is renamed to ``out_dir`` only when complete, so an interrupted run never leaves a half-written
    data set behind.

    Args:
        out_dir: folder to create, holding ``train/``, ``val/``, ``LOC_synset_mapping.txt`` and
            ``demo.json`` (the parameters and counts).
        num_classes: classes, one wnid folder each (at least 2).
        train_per_class: training images per class (at least 1).
        val_per_class: validation images per class (at least 1).
        image_size: side of the square images, in pixels (at least 32).
        seed: same seed and arguments, byte-identical files (non-negative).
        jpeg_quality: PIL JPEG quality, 1 to 100.
        show_progress: show a tqdm progress bar.

    Returns:
        ``{"out_dir", "classes" (wnids in label order), "class_names", "counts" ({split: images})}``.

    Raises:
        ValueError: an argument is out of range; the message names it.
    """
    _check_int("num_classes", num_classes, 2)
    _check_int("train_per_class", train_per_class, 1)
    _check_int("val_per_class", val_per_class, 1)
    _check_int("image_size", image_size, 32)
    _check_int("seed", seed, 0)
    _check_int("jpeg_quality", jpeg_quality, 1, 100)
    out_dir = Path(out_dir).absolute()  # so that "." still has a name to put ".tmp" after
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")

    specs = class_specs(num_classes)
    per_class: dict[Split, int] = {"train": train_per_class, "val": val_per_class}
    counts = {split: k * num_classes for split, k in per_class.items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        log.warning("removing %s left by an interrupted run", tmp)
        shutil.rmtree(tmp)
    log.info(
        "generating %d train + %d val images of %d classes (%dpx, seed %d) into %s",
        counts["train"],
        counts["val"],
        num_classes,
        image_size,
        seed,
        out_dir,
    )
    start = time.perf_counter()
    with tqdm(total=sum(counts.values()), unit="img", desc="demo data", disable=not show_progress) as bar:
        for split, k in per_class.items():
            for c, spec in enumerate(specs):
                distractors = distractor_classes(spec, specs)
                folder = tmp / split / spec.wnid
                folder.mkdir(parents=True)
                for i in range(k):
                    image = render_image(
                        spec,
                        distractors,
                        seed=seed,
                        split=split,
                        class_index=c,
                        index=i,
                        image_size=image_size,
                    )
                    image.save(folder / f"{spec.wnid}_{i}.JPEG", format="JPEG", quality=jpeg_quality)
                    bar.update()
    (tmp / "LOC_synset_mapping.txt").write_text("".join(f"{s.wnid} {s.name}\n" for s in specs))
    meta = {
        "generator": "pipeline.demo_data",
        "version": GENERATOR_VERSION,
        "params": {
            "num_classes": num_classes,
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "image_size": image_size,
            "seed": seed,
            "jpeg_quality": jpeg_quality,
        },
        "counts": counts,
    }
    (tmp / "demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _replace_dir(tmp, out_dir)
    elapsed = time.perf_counter() - start
    log.info(
        "wrote %d images to %s in %.1f s (%.0f images/s)",
        sum(counts.values()),
        out_dir,
        elapsed,
        sum(counts.values()) / max(elapsed, 1e-9),
    )
    return {
        "out_dir": str(out_dir),
        "classes": [s.wnid for s in specs],
        "class_names": [s.name for s in specs],
        "counts": counts,
    }
