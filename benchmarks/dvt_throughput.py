"""Benchmark: DVT's batched early exit against its static backbone and against simulate-all, side by side.

    python -m benchmarks.dvt_throughput [--model dvt_t2t_vit_12] [--img-size 224] [--batch 128]
        [--threads 2] [--exits 0.6 0.25 0.15] [--repeats 3] [--warmup 1] [--json out.json] [--cpu-time]

No trained checkpoint is needed: the cascade and its static backbone are randomly initialised, and the
thresholds are set on the timed batch itself (the MSDNet rule on that batch's confidences) so that the
given fractions of its images leave at each exit. All three ways then run on that same batch
(:mod:`pipeline.dvt.speed`: warm-up discarded, median of repeats):

* early exit (:func:`pipeline.dvt.inference.early_exit`), beside its MACs-ideal speed-up over the
  static backbone (the backbone's MACs over the cascade's average MACs at these exits) and over
  simulate-all (the full cascade's MACs over that average);
* simulate-all: every stage on every image, the exits applied afterwards (the authors' code);
* the static backbone (T2T-ViT-12 for DVT-T2T-ViT-12, and so on).

The reached share of the ideal is the measured speed-up over the ideal one.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import timm
import torch

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.dvt import speed
from pipeline.dvt.inference import all_stage_logits, early_exit
from pipeline.dvt.speed import time_early_exit, time_simulate_all, time_static
from pipeline.dvt.thresholds import calibrate_thresholds
from pipeline.models.cost import count_macs

#: The static model each registered cascade is built from.
BACKBONES = {
    "dvt_t2t_vit_12": "t2t_vit_12",
    "dvt_t2t_vit_14": "t2t_vit_14",
    "dvt_deit_small": "deit_small_paper",
}


def measure(
    model: str,
    *,
    img_size: int,
    batch: int,
    exits: list[float],
    repeats: int,
    warmup: int,
    num_classes: int = 1000,
    model_kwargs: dict | None = None,
) -> dict:
    """Images/s of early exit, simulate-all and the static backbone on one random batch."""
    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes, "img_size": img_size, **(model_kwargs or {})}
    cascade = timm.create_model(model, **kwargs).eval()
    static = timm.create_model(BACKBONES[model], **kwargs).eval()
    images = torch.randn(batch, 3, img_size, img_size)
    stage_macs = [float(m) for m in cascade.stage_macs(img_size)]
    confidences = all_stage_logits(cascade, images).float().softmax(-1).amax(-1).double().numpy()
    thresholds = calibrate_thresholds(confidences, exits).tolist()
    reached = early_exit(cascade, images, thresholds, stage_macs)
    fractions = np.bincount(reached.exits.numpy(), minlength=cascade.num_exits) / batch
    avg_macs = float(reached.macs.mean())
    static_macs = float(count_macs(static, img_size))
    rates = {
        "early_exit": time_early_exit(cascade, images, thresholds, stage_macs, warmup, repeats),
        "simulate_all": time_simulate_all(cascade, images, thresholds, warmup, repeats),
        "static": time_static(static, images, warmup, repeats),
    }
    return {
        "model": model,
        "static_model": BACKBONES[model],
        "img_size": img_size,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}",
        "clock": speed.CLOCK[0].__name__,
        "exit_fractions": fractions.tolist(),
        "avg_gmacs": avg_macs / 1e9,
        "static_gmacs": static_macs / 1e9,
        "full_gmacs": sum(stage_macs) / 1e9,
        "images_per_s": rates,  # per second of the clock
        "vs_static": rates["early_exit"] / rates["static"],
        "vs_static_ideal": static_macs / avg_macs,
        "vs_simulate": rates["early_exit"] / rates["simulate_all"],
        "vs_simulate_ideal": sum(stage_macs) / avg_macs,
    }


def table(result: dict) -> str:
    """The result as a Markdown table."""
    r, rates = result, result["images_per_s"]
    exits = " / ".join(f"{100 * f:.0f}" for f in r["exit_fractions"])
    lines = [
        f"{r['model']} vs {r['static_model']}, {r['img_size']} px, batch {r['batch']}, "
        f"{r['threads']} threads, {r['clock']}, exits {exits} %, {r['avg_gmacs']:.3f} G average "
        f"({r['machine']})",
        "",
        "| way | images/s | speed-up of early exit | MACs-ideal | share of ideal |",
        "|---|---:|---:|---:|---:|",
        f"| early exit | {rates['early_exit']:.1f} | | | |",
        f"| static {r['static_model']} | {rates['static']:.1f} | {r['vs_static']:.2f}x | "
        f"{r['vs_static_ideal']:.2f}x | {100 * r['vs_static'] / r['vs_static_ideal']:.0f} % |",
        f"| simulate-all | {rates['simulate_all']:.1f} | {r['vs_simulate']:.2f}x | "
        f"{r['vs_simulate_ideal']:.2f}x | {100 * r['vs_simulate'] / r['vs_simulate_ideal']:.0f} % |",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dvt_t2t_vit_12", choices=sorted(BACKBONES))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exits", type=float, nargs=3, default=[0.6, 0.25, 0.15], help="fractions per exit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"depth\": 2}' for a smoke run")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the thread's CPU time on 1 thread (steadier on a busy machine than wall time)",
    )
    args = p.parse_args()
    if args.cpu_time:
        speed.CLOCK[0] = time.thread_time
        args.threads = 1
    torch.set_num_threads(args.threads)
    result = measure(
        args.model,
        img_size=args.img_size,
        batch=args.batch,
        exits=args.exits,
        repeats=args.repeats,
        warmup=args.warmup,
        num_classes=args.num_classes,
        model_kwargs=json.loads(args.model_kwargs),
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
