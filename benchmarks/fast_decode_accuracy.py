"""Benchmark: does reduced-size JPEG decoding (``train.augment.fast_decode``) keep the accuracy?
Trains the same model with full and with fast decoding, same seed, same shards, in one process.

    python -m benchmarks.fast_decode_accuracy [--image-size 320] [--seeds 0 1] [--epochs 5] [--workdir DIR]

The demo's own 72 px images are too small for the fast path at 64 px (a crop must keep at least
128 px per side to decode at 1/2), so this generates the demo data set (``pipeline.demo_data``,
fixed seed, ImageNet layout) at a larger ``--image-size``, shards it with the project's sharding
(``pipeline.shards.write_shards``) into ``--workdir`` (default: a temporary folder, removed at the
end), then trains ``--variant`` from ``--params`` (the demo's recipe: its train section, on one
process with as many torch threads as CPUs) once per seed and flag through the project's own
``fit`` and ``LocalSession`` (no Ray, no MLflow). The two runs of a seed draw the same initial
weights, batches, crops and flips: they differ only in how each JPEG is decoded.

The transforms the training builds are wrapped so that every decode is counted: how many images
were decoded at 1/2, 1/4 or 1/8 scale, and the time spent decoding and augmenting. Each final
model is also evaluated with both evaluation transforms, which separates the effect of fast
decoding at evaluation from its effect on training.

Prints the machine, how often the fast path drafted, and markdown tables: per run and per flag
(mean over seeds) the final val top-1 and top-5, training images/s (the best epoch's, as other
benchmarks take the best repeat) and the ratio fast / full; the top-1 difference fast - full in
points beside the binomial standard error of one top-1 on the validation set and the spread
between seeds of the same flag (the noise to judge it by). The default, 2 seeds, takes about 10
minutes on 2 cores; each further seed about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.fast_decode_accuracy")


class CountedDecode:
    """A transform wrapper that records the DCT scale every image was decoded at, and the time.

    It takes the opened, not yet decoded image (``takes_encoded``), as :class:`FastDecode` does,
    and gives the wrapped transform what :func:`pipeline.data.decode_sample` would have given it.
    The decoded scale is read from the image afterwards: ``Image.draft`` shrinks ``img.size``.
    """

    takes_encoded = True

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.scales: Counter[int] = Counter()
        self.seconds = 0.0

    def __call__(self, img: Any) -> Any:
        width = img.width
        tic = time.perf_counter()
        out = (
            self.inner(img) if getattr(self.inner, "takes_encoded", False) else self.inner(img.convert("RGB"))
        )
        self.seconds += time.perf_counter() - tic
        self.scales[round(width / img.width)] += 1
        return out

    @property
    def images(self) -> int:
        return sum(self.scales.values())

    @property
    def drafted(self) -> int:
        return self.images - self.scales[1]


@contextlib.contextmanager
def counting(counters: list[CountedDecode]) -> Iterator[None]:
    """Within the block, ``fit`` builds its transforms wrapped in :class:`CountedDecode` (appended
    to ``counters``: train, then eval)."""
    import pipeline.train.loop as loop

    original = loop.build_transforms

    def wrapped(img_size: int, aug: Any) -> tuple[CountedDecode, CountedDecode]:
        train, evaluate = original(img_size, aug)
        counters[:] = [CountedDecode(train), CountedDecode(evaluate)]
        return counters[0], counters[1]

    loop.build_transforms = wrapped
    try:
        yield
    finally:
        loop.build_transforms = original


@dataclass
class Result:
    seed: int
    fast: bool
    top1: float
    top5: float
    images_per_s: float
    seconds: float
    train_scales: Counter[int]
    val_scales: Counter[int]
    decode_ms: float  # decode + augmentation per training image
    cross: dict[bool, float] = field(default_factory=dict)  # eval flag -> top-1 of the final model


def prepare(workdir: Path, args: argparse.Namespace, shard_cfg: Any) -> Path:
    """The demo data set at ``--image-size`` and its shards under ``workdir``; kept when already there
    with the same parameters."""
    import json

    from pipeline.demo_data import generate_demo
    from pipeline.shards import write_shards

    images, shards = workdir / "images", workdir / "shards"
    wanted = {
        "num_classes": args.classes,
        "train_per_class": args.train_per_class,
        "val_per_class": args.val_per_class,
        "image_size": args.image_size,
        "seed": args.data_seed,
    }
    meta = images / "demo.json"
    if not (
        meta.is_file() and all(json.loads(meta.read_text())["params"].get(k) == v for k, v in wanted.items())
    ):
        tic = time.perf_counter()
        generate_demo(images, **wanted, show_progress=False)
        log.info("generated the data set in %.0f s", time.perf_counter() - tic)
    tic = time.perf_counter()
    write_shards(
        images,
        shards,
        max_samples_per_shard=shard_cfg.max_samples_per_shard,
        seed=shard_cfg.seed,
        workers=1,
        show_progress=False,
    )  # keeps complete shards of the same plan
    log.info("sharded in %.0f s", time.perf_counter() - tic)
    return shards


def evaluate_with(spec: Any, state: dict[str, Any], fast: bool) -> float:
    """Top-1 of the final weights in ``state`` on the validation split, decoded fast or in full."""
    from pipeline.data import build_eval_loader, build_transforms
    from pipeline.train.loop import build_model, evaluate
    from pipeline.train.task import task_for

    cfg = spec.train
    model = build_model(spec)
    model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    aug = cfg.augment.model_copy(update={"fast_decode": fast})
    _, eval_tf = build_transforms(cfg.img_size, aug)
    loader, _ = build_eval_loader(
        spec.shards, rank=0, world_size=1, batch_size=cfg.batch_size, transform=eval_tf
    )
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    return evaluate(model, loader, task_for(model, spec.num_classes, aug), torch.device("cpu"), autocast)[
        "val_top1"
    ]


def train_once(base: Any, seed: int, fast: bool) -> Result:
    from pipeline.train.loop import LocalSession, RunSpec, fit

    train = base.train.model_copy(
        update={"seeds": [seed], "augment": base.train.augment.model_copy(update={"fast_decode": fast})}
    )
    spec = RunSpec(**{**base.__dict__, "train": train, "variant": f"{base.variant}-fast{int(fast)}-s{seed}"})
    counters: list[CountedDecode] = []
    session = LocalSession()
    tic = time.perf_counter()
    with counting(counters):
        metrics = fit(spec, session)
    seconds = time.perf_counter() - tic
    epochs = [m for m in session.history if "val_top1" in m]
    # The best epoch, as the other benchmarks take the best of their repeats: on a shared machine
    # another job's burst slows whole epochs, and the fastest is the least disturbed.
    rate = max(m["images_per_s"] for m in epochs)
    train_tf, eval_tf = counters
    result = Result(
        seed=seed,
        fast=fast,
        top1=metrics["val_top1"],
        top5=metrics["val_top5"],
        images_per_s=rate,
        seconds=seconds,
        train_scales=train_tf.scales,
        val_scales=eval_tf.scales,
        decode_ms=1000 * train_tf.seconds / max(train_tf.images, 1),
    )
    result.cross = {flag: evaluate_with(spec, session.state, flag) for flag in (False, True)}
    log.info(
        "seed %d fast_decode %s: top-1 %.1f top-5 %.1f, %.0f images/s, %.0f s",
        seed,
        fast,
        result.top1,
        result.top5,
        rate,
        seconds,
    )
    return result


def _scales(c: Counter[int]) -> str:
    total = sum(c.values())
    drafted = total - c[1]
    parts = ", ".join(f"1/{s}: {c[s]}" for s in (2, 4, 8) if c[s])
    return f"{drafted} of {total} ({100 * drafted / max(total, 1):.0f} %)" + (f"; {parts}" if parts else "")


def _mean_spread(values: list[float], fmt: str = ".1f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(results: list[Result], args: argparse.Namespace, n_val: int, wall: float) -> None:
    seeds = sorted({r.seed for r in results})
    by = {(r.seed, r.fast): r for r in results}
    print()
    print("Per run (the two runs of a seed differ only in JPEG decoding):")
    print()
    print("| fast_decode | seed | val top-1 % | val top-5 % | train images/s (best epoch) "
          "| fast / full images/s | top-1 fast - full, points |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for seed in seeds:
        full, fast = by[(seed, False)], by[(seed, True)]
        print(f"| false | {seed} | {full.top1:.1f} | {full.top5:.1f} | {full.images_per_s:.0f} | 1.00 | |")
        print(
            f"| true | {seed} | {fast.top1:.1f} | {fast.top5:.1f} | {fast.images_per_s:.0f} "
            f"| {fast.images_per_s / full.images_per_s:.2f} | {fast.top1 - full.top1:+.1f} |"
        )
    print()
    label = (
        "mean (min-max) over seeds " + ", ".join(map(str, seeds)) if len(seeds) > 1 else f"seed {seeds[0]}"
    )
    print(f"Per flag, {label}:")
    print()
    print("| fast_decode | val top-1 % | val top-5 % | train images/s (best epoch) | fast / full images/s "
          "| top-1 fast - full, points |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    cols = {}
    for fast in (False, True):
        runs = [by[(s, fast)] for s in seeds]
        cols[fast] = runs
        ratio = [by[(s, True)].images_per_s / by[(s, False)].images_per_s for s in seeds]
        delta = [by[(s, True)].top1 - by[(s, False)].top1 for s in seeds]
        extra = (
            f"| {statistics.mean(ratio):.2f} | {statistics.mean(delta):+.1f} "
            f"({min(delta):+.1f} to {max(delta):+.1f}) |"
            if fast
            else "| 1.00 | |"
        )
        print(
            f"| {str(fast).lower()} | {_mean_spread([r.top1 for r in runs])} "
            f"| {_mean_spread([r.top5 for r in runs])} "
            f"| {_mean_spread([r.images_per_s for r in runs], '.0f')} {extra}"
        )
    p = statistics.mean(r.top1 for r in results) / 100
    se = 100 * math.sqrt(p * (1 - p) / n_val)
    print()
    print(
        f"Noise: the binomial standard error of one top-1 on {n_val} validation images is {se:.1f} points "
        f"at {100 * p:.0f} %, so {math.sqrt(2) * se:.1f} points for the difference of two independent runs."
    )
    if len(seeds) > 1:
        for fast in (False, True):
            top1 = [r.top1 for r in cols[fast]]
            print(
                f"Seed to seed with fast_decode {str(fast).lower()}: top-1 standard deviation "
                f"{statistics.stdev(top1):.1f} points, range {max(top1) - min(top1):.1f}."
            )
        delta = [by[(s, True)].top1 - by[(s, False)].top1 for s in seeds]
        print(
            f"Paired difference fast - full over {len(seeds)} seeds: {statistics.mean(delta):+.1f} "
            f"+- {statistics.stdev(delta) / math.sqrt(len(delta)):.1f} points (mean +- standard error)."
        )
    print()
    print("Decoding (counted in the training itself; validation: every evaluation, one per epoch):")
    print()
    print("| fast_decode | seed | training images decoded smaller | validation images decoded smaller "
          "| decode + augment, ms per training image |")  # fmt: skip
    print("|---|---:|---|---|---:|")
    for r in results:
        print(f"| {str(r.fast).lower()} | {r.seed} | {_scales(r.train_scales)} | {_scales(r.val_scales)} "
              f"| {r.decode_ms:.2f} |")  # fmt: skip
    print()
    print("Each final model evaluated with both evaluation transforms (val top-1 %):")
    print()
    print("| trained with fast_decode | seed | eval full decode | eval fast decode | fast - full, points |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {str(r.fast).lower()} | {r.seed} | {r.cross[False]:.1f} | {r.cross[True]:.1f} "
              f"| {r.cross[True] - r.cross[False]:+.1f} |")  # fmt: skip
    print()
    print(
        f"Total wall time {wall:.0f} s ({wall / 60:.1f} min), "
        f"of which training and evaluation {sum(r.seconds for r in results):.0f} s."
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipe: train section")
    p.add_argument("--variant", default="t2t_vit_7", help="a variant of --params")
    p.add_argument("--image-size", type=int, default=320, help="side of the generated source images")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data set")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="training seeds, one pair of runs each"
    )
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--workdir", type=Path, help="keep data and shards here (default: a temporary folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from pipeline.config import load_config
    from pipeline.shards import read_manifest
    from pipeline.train.loop import RunSpec

    wall = time.perf_counter()
    cfg = load_config(args.params)
    train = cfg.train_for(args.variant)
    update: dict[str, Any] = {"num_workers": 1, "torch_threads": args.threads}
    if args.epochs:
        update["epochs"] = args.epochs
    train = train.model_copy(update=update)
    torch.set_num_threads(args.threads)
    variant = cfg.variants[args.variant]
    a = train.augment
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{datetime.date.today()}"
    )
    print(
        f"data: pipeline.demo_data, {args.classes} classes x ({args.train_per_class} train + "
        f"{args.val_per_class} val), {args.image_size}x{args.image_size} px JPEG, seed {args.data_seed}"
    )
    print(
        f"recipe ({args.params}, variant {args.variant}): {variant.model} at {train.img_size} px, "
        f"{train.epochs} epochs, batch {train.batch_size}, lr {train.lr:g}, warmup {train.warmup_epochs:g}, "
        f"cooldown {train.cooldown_epochs}, scale_min {a.scale_min}, crop_pct {a.crop_pct}, "
        f"{a.interpolation}; 1 process, loader_workers {train.loader_workers}; seeds {args.seeds}"
    )
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fast-decode-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        shards = prepare(workdir, args, cfg.data.shards)
        manifest = read_manifest(shards)
        base = RunSpec(
            variant=args.variant,
            model=variant.model,
            train=train,
            shards=str(shards.resolve()),
            num_classes=len(manifest["classes"]),
            model_kwargs=dict(variant.model_kwargs),
        )
        results = []
        # Full then fast for the first seed, fast then full for the next, and so on: neither flag
        # always pays the first run's start-up or the same drift in the machine's load.
        for i, seed in enumerate(args.seeds):
            for fast in (False, True) if i % 2 == 0 else (True, False):
                results.append(train_once(base, seed, fast))
        report(results, args, int(manifest["splits"]["val"]["count"]), time.perf_counter() - wall)


if __name__ == "__main__":
    main()
