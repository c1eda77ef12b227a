"""The parts of ``benchmarks/gpu_suite.py`` (its docstring describes them): each takes the run's
:class:`~benchmarks.gpu_suite.Context` and records its figures on a :class:`~benchmarks.gpu_suite.Recorder`.

Every import of the project's data and training modules happens inside the part that needs it, so
that parts a-c run where pydantic and webdataset are missing.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from benchmarks.gpu_suite import Context, Recorder, Sizes

FLAG_SETS: dict[str, dict[str, bool]] = {
    "bf16": {},
    "bf16 + channels_last": {"channels_last": True},
    "bf16 + compile": {"compile": True},
    "bf16 + compile + channels_last": {"compile": True, "channels_last": True},
}
MFU_MODELS = ("t2t_vit_14", "deit_small_paper", "dvt_t2t_vit_12")
SPEED_MODELS = ("t2t_vit_14", "deit_small_paper", "t2t_vit_t_14")
EXIT_PROPORTIONS = (0.60, 0.25, 0.15)
MFU_GOAL, SPEED_GOAL, DVT_PAPER_SPEEDUP = 0.35, 1.3, 1.42
PROFILE = Path(__file__).parents[1] / "profiles" / "imagenet.yaml"


# ------------------------------------------------------------------ helpers shared by the parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _create(name: str, ctx: Context, img: int, device: torch.device | str, **kwargs: Any) -> torch.nn.Module:
    import timm

    import pipeline.models  # noqa: F401 - registers the study's models

    torch.manual_seed(0)
    with torch.device(device):
        return timm.create_model(name, img_size=img, **{**ctx.sizes.model_kwargs, **kwargs})


def _macs(name: str, ctx: Context, img: int, **kwargs: Any) -> int:
    from pipeline.models import count_macs

    return count_macs(_create(name, ctx, img, "meta", num_classes=1000, **kwargs), img)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, rounds: int) -> float:
    """Seconds per call of ``fn``: the best of ``rounds`` runs of ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(rounds):
        _sync(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - tic) / repeats)
    return best


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    outputs = output if isinstance(output, (list, tuple)) else [output]  # DVT: one logits per exit
    return sum(F.cross_entropy(o.float(), labels) for o in outputs)


def _rate(x: float) -> str:
    return f"{x:,.0f} img/s" if x >= 100 else f"{x:,.1f} img/s"


def _train_rate(
    name: str, ctx: Context, img: int, channels_last: bool = False, compile: bool = False
) -> tuple[float, float]:
    """Training images/s of ``name`` (AdamW, bf16 autocast) and the seconds of its first step."""
    from timm.optim import create_optimizer_v2

    s, device = ctx.sizes, ctx.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _create(name, ctx, img, device, num_classes=1000).to(memory_format=fmt).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    net = torch.compile(model) if compile else model
    images = torch.randn(s.batch, 3, img, img, device=device).to(memory_format=fmt)
    labels = torch.randint(0, 1000, (s.batch,), device=device)

    def step() -> None:
        with _autocast(device):
            loss = _loss(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tic = time.perf_counter()
    step()  # compiles, if compiling
    _sync(device)
    first = time.perf_counter() - tic
    return s.batch / _timed(step, device, s.warmup, s.steps, 1), first


def _fwd_bwd_rate(model: torch.nn.Module, images: torch.Tensor, ctx: Context) -> float:
    """Forward + backward images/s of ``model`` in bf16 autocast (no optimizer)."""

    def fwd_bwd() -> None:
        with _autocast(ctx.device):
            out = model(images)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    s = ctx.sizes
    return images.shape[0] / _timed(fwd_bwd, ctx.device, s.warmup, max(1, s.steps // 2), 1)


def _compare(
    name: str, ctx: Context, plain_attention: Any
) -> tuple[tuple[float, float, int], tuple[float, float]]:
    """Max relative logit difference (fp32, bf16) of the fused and plain formulations, the layers
    switched, and the best of two interleaved fwd+bwd images/s of each."""
    s, device = ctx.sizes, ctx.device
    model = _create(name, ctx, s.img, device, num_classes=1000).eval()
    images = torch.randn(s.batch, 3, s.img, s.img, device=device)
    with torch.no_grad():
        check = images[:8]
        fused32 = model(check)
        with plain_attention(model) as switched:
            plain32 = model(check)
        with _autocast(device):
            fused16 = model(check).float()
            with plain_attention(model):
                plain16 = model(check).float()
    diff32 = ((fused32 - plain32).abs().max() / plain32.abs().max()).item()
    diff16 = ((fused16 - plain16).abs().max() / plain16.abs().max()).item()
    model.train()
    rates: dict[str, list[float]] = {"fused": [], "plain": []}
    for _ in range(2):  # interleaved, so drifting clocks hit both alike
        rates["fused"].append(_fwd_bwd_rate(model, images, ctx))
        with plain_attention(model):
            rates["plain"].append(_fwd_bwd_rate(model, images, ctx))
    return (diff32, diff16, switched), (max(rates["fused"]), max(rates["plain"]))


def _failed(rec: Recorder, model: str, setting: str, err: BaseException, device: torch.device) -> None:
    """Record a setting that raised (the part goes on with the next one)."""
    first = (str(err).strip().splitlines() or [""])[0][:160]
    rec.row(
        model,
        setting,
        f"failed: {type(err).__name__}: {first}",
        verdict="error",
        error=traceback.format_exception(err),
    )
    rec.errors += 1
    _free(device)


# ------------------------------------------------------------------ the parts


def probe(ctx: Context, rec: Recorder) -> None:
    """Which device the parts will run on (the parent must not initialise CUDA itself)."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if ctx.device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible: run on a GPU machine, or pass --smoke on a CPU")
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(
            gpu=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    rec.info(**info)


def make_data(ctx: Context, rec: Recorder) -> None:
    """Render the demo classes at the suite's size (in parallel) and shard them with the project's writer."""
    from pipeline.shards import write_shards

    s = ctx.sizes
    source = ctx.scratch / "images"
    jobs = [
        (split, c, i)
        for split, k in (("train", s.train_per_class), ("val", s.val_per_class))
        for c in range(s.classes)
        for i in range(k)
    ]
    tic = time.perf_counter()
    workers = max(1, min(os.cpu_count() or 1, 16))
    with mp.get_context("fork").Pool(workers, initializer=_render_init, initargs=(source, s)) as pool:
        for _ in pool.imap_unordered(_render_one, jobs, chunksize=16):
            pass
    from pipeline.demo_data import class_specs

    specs = class_specs(s.classes)
    (source / "LOC_synset_mapping.txt").write_text("".join(f"{x.wnid} {x.name}\n" for x in specs))
    rendered = time.perf_counter() - tic
    run = write_shards(
        source,
        ctx.shards,
        max_samples_per_shard=max(8, len(jobs) // 32),
        workers=workers,
        show_progress=False,
    )
    shutil.rmtree(source)
    rec.info(
        images=len(jobs),
        image_size=s.data_img,
        render_s=rendered,
        shard_s=run.seconds,
        shard_workers=run.started,
    )


_RENDER: dict[str, Any] = {}


def _render_init(source: Path, sizes: Sizes) -> None:
    from pipeline.demo_data import class_specs, distractor_classes

    specs = class_specs(sizes.classes)
    _RENDER.update(
        source=source,
        size=sizes.data_img,
        specs=specs,
        distractors=[distractor_classes(x, specs) for x in specs],
    )


def _render_one(job: tuple[str, int, int]) -> None:
    from pipeline.demo_data import render_image

    split, c, i = job
    spec = _RENDER["specs"][c]
    folder = _RENDER["source"] / split / spec.wnid
    folder.mkdir(parents=True, exist_ok=True)
    image = render_image(
        spec,
        _RENDER["distractors"][c],
        seed=0,
        split=split,
        class_index=c,
        index=i,
        image_size=_RENDER["size"],
    )
    image.save(folder / f"{spec.wnid}_{i}.JPEG", format="JPEG", quality=90)


def part_a(ctx: Context, rec: Recorder) -> None:
    """Training images/s and MFU per speed flag."""
    from benchmarks.gpu_mfu import matmul_peak

    s, device = ctx.sizes, ctx.device
    peak = matmul_peak(device, torch.bfloat16, n=s.matmul_n, repeats=20 if device.type == "cuda" else 2)
    rec.row(
        "bf16 matmul", f"{s.matmul_n}^3", f"{peak / 1e12:.1f} TFLOP/s", verdict="measured peak", flops=peak
    )
    sides = {name: s.dvt_img if name.startswith("dvt") else s.img for name in MFU_MODELS}
    all_macs = {name: _macs(name, ctx, img) for name, img in sides.items()}
    # Flag by flag, so that the eager figures of every model come before the first compilation.
    for label, flags in FLAG_SETS.items():
        for name, img in sides.items():
            macs = all_macs[name]
            goal = f">= {MFU_GOAL:.0%} MFU" if name == "t2t_vit_14" else ""
            if flags.get("compile") and not s.compile:
                rec.row(name, label, "not run", verdict="compile skipped on CPU (--smoke)", flags=label)
                continue
            try:
                rate, first = _train_rate(name, ctx, img, **flags)
            except Exception as err:  # noqa: BLE001 - one setting's failure (OOM, compile) is a finding
                _failed(rec, name, label, err, device)
                continue
            mfu = rate * macs * 3 * 2 / peak
            verdict = ("met" if mfu >= MFU_GOAL else "missed") if goal else ""
            result = f"{_rate(rate)}, MFU {100 * mfu:.1f} %"
            rec.row(
                name,
                label,
                result,
                goal,
                verdict,
                flags=label,
                images_per_s=rate,
                mfu=mfu,
                macs=macs,
                batch=s.batch,
                img_size=img,
                first_step_s=first,
            )
            _free(device)


def part_b(ctx: Context, rec: Recorder) -> None:
    """Forward+backward images/s of the models against the plain formulation, and their agreement."""
    from benchmarks.reference_attention import plain_attention

    s, device = ctx.sizes, ctx.device
    for name in SPEED_MODELS:
        setting = "fused vs plain, fwd+bwd bf16, eager"
        try:
            (diff32, diff16, switched), (fused, plain) = _compare(name, ctx, plain_attention)
        except Exception as err:  # noqa: BLE001 - one model's failure (OOM) is a finding
            _failed(rec, name, setting, err, device)
            continue
        agree = diff32 <= 1e-3 and diff16 <= 5e-2
        rec.checks[f"{name} outputs agree"] = agree
        result = (
            f"{fused / plain:.2f}x ({_rate(fused)} vs {_rate(plain)}); max diff {diff32:.1e} fp32, "
            f"{diff16:.1e} bf16"
        )
        verdict = ("met" if fused / plain >= SPEED_GOAL else "missed") + ("" if agree else ", DISAGREE")
        rec.row(
            name,
            setting,
            result,
            f">= {SPEED_GOAL}x; outputs agree",
            verdict,
            fused_images_per_s=fused,
            plain_images_per_s=plain,
            speedup=fused / plain,
            max_rel_diff_fp32=diff32,
            max_rel_diff_bf16=diff16,
            layers_switched=switched,
            batch=s.batch,
            img_size=s.img,
        )
        _free(device)


def part_c(ctx: Context, rec: Recorder) -> None:
    """Early exit against simulate-all and the static backbones, each against its MACs-ideal speed-up."""
    import numpy as np

    from pipeline.dvt import all_stage_logits, calibrate_thresholds, early_exit

    s, device, img = ctx.sizes, ctx.device, ctx.sizes.dvt_img
    stage_macs = _create("dvt_t2t_vit_12", ctx, img, "meta", num_classes=1000).stage_macs(img)
    static_macs = {name: _macs(name, ctx, img) for name in ("t2t_vit_12", "t2t_vit_14")}
    model = _create("dvt_t2t_vit_12", ctx, img, device, num_classes=1000).eval()
    images = torch.randn(s.batch, 3, img, img, device=device)
    with _autocast(device):
        confidences = all_stage_logits(model, images).float().softmax(dim=-1).amax(dim=-1)
        thresholds = calibrate_thresholds(confidences.cpu().numpy(), EXIT_PROPORTIONS)
        result = early_exit(model, images, thresholds, stage_macs)
        runs = {
            "early exit": partial(early_exit, model, images, thresholds, stage_macs),
            "simulate": partial(all_stage_logits, model, images),
        }
        for name in static_macs:
            static = _create(name, ctx, img, device, num_classes=1000).eval()
            runs[name] = torch.no_grad()(partial(static, images))
        seconds = {k: _timed(fn, device, s.warmup, s.repeats, s.rounds) for k, fn in runs.items()}
        del runs
    fractions = np.bincount(result.exits.cpu().numpy(), minlength=model.num_exits) / s.batch
    avg_macs = float(result.macs.mean())
    split = "/".join(f"{100 * f:.0f}" for f in fractions)
    rec.row(
        "dvt_t2t_vit_12",
        f"early exit, batch {s.batch}",
        f"{_rate(s.batch / seconds['early exit'])}; exits {split} %",
        "exits " + "/".join(f"{100 * p:.0f}" for p in EXIT_PROPORTIONS) + " %",
        images_per_s=s.batch / seconds["early exit"],
        exit_fractions=fractions.tolist(),
        thresholds=[float(t) for t in thresholds],
        avg_macs=avg_macs,
        stage_macs=stage_macs,
        batch=s.batch,
        img_size=img,
    )
    references = {"simulate": float(sum(stage_macs)), **{k: float(v) for k, v in static_macs.items()}}
    for ref, macs in references.items():
        measured, ideal = seconds[ref] / seconds["early exit"], macs / avg_macs
        goal = f"paper: {DVT_PAPER_SPEEDUP}x at equal top-1" if ref == "t2t_vit_14" else ""
        rec.row(
            "dvt_t2t_vit_12",
            f"early exit vs {ref}",
            f"{measured:.2f}x = {100 * measured / ideal:.0f} % of the MACs-ideal {ideal:.2f}x",
            goal,
            reference=ref,
            reference_images_per_s=s.batch / seconds[ref],
            speedup=measured,
            ideal=ideal,
            share_of_ideal=measured / ideal,
        )
    rec.note(
        "Random weights: the 60/25/15 % split is set on the batch, not reached at a given accuracy; "
        "the paper's 1.42x over T2T-ViT-14 needs trained weights and calibrated thresholds."
    )


def _profile_augment() -> Any:
    """The ImageNet profile's training augmentation (profiles/imagenet.yaml), as the loop would get it."""
    import yaml

    from pipeline.config import AugmentConfig

    raw = yaml.safe_load(PROFILE.read_text())["train"]["augment"]
    fields = AugmentConfig.model_fields
    return AugmentConfig(**{k: v for k, v in raw.items() if k in fields})


def _best_step_rates(ctx: Context) -> dict[str, float]:
    rows = ctx.results.get("a", {}).get("rows", [])
    best: dict[str, float] = {}
    for row in rows:
        if "images_per_s" in row:
            model = row["table"]["model"]
            best[model] = max(best.get(model, 0.0), row["images_per_s"])
    return best


def part_d(ctx: Context, rec: Recorder) -> None:
    """The loader's images/s against the step's, and JPEG decoding plus augmentation on the GPU."""
    from torch.utils.data import DataLoader

    from pipeline.data import ShardStream, build_transforms, read_samples, shard_urls

    s, device = ctx.sizes, ctx.device
    urls, _ = shard_urls(ctx.shards, "train")
    steps = _best_step_rates(ctx)
    t2t = steps.get("t2t_vit_14")
    aug = _profile_augment()
    for label, fast in (("ImageNet profile augmentation", aug.fast_decode), ("+ fast_decode", True)):
        if label.startswith("+") and aug.fast_decode:
            continue
        train_tf, _ = build_transforms(s.img, aug.model_copy(update={"fast_decode": fast}))
        dataset = ShardStream(
            urls,
            rank=0,
            world_size=1,
            transform=train_tf,
            batches_per_rank=s.loader_batches,
            batch_size=s.batch,
            seed=0,
        )
        loader = DataLoader(
            dataset,
            batch_size=s.batch,
            num_workers=s.loader_workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        tic = time.perf_counter()
        count, start = 0, None
        for images, _labels in loader:
            images.to(device, non_blocking=True)
            if start is None:
                start, first = time.perf_counter(), time.perf_counter() - tic
            else:
                count += images.shape[0]
        rate = count / (time.perf_counter() - start) if count else float("nan")
        goal = f">= step rate of t2t_vit_14 ({_rate(t2t)})" if t2t else ">= step rate (part a did not run)"
        verdict = "" if t2t is None else ("keeps up" if rate >= t2t else "bottleneck")
        rec.row(
            f"loader, {s.loader_workers} processes",
            f"{label}, {s.img} px",
            f"{_rate(rate)} (first batch after {first:.1f} s)",
            goal,
            verdict,
            fast_decode=fast,
            images_per_s=rate,
            workers=s.loader_workers,
            first_batch_s=first,
            step_rates=steps,
        )
    datas = []
    for sample in read_samples(urls):
        datas.append(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8))
        if len(datas) == s.batch:
            break
    rate = s.batch / _timed(
        lambda: _gpu_augment(datas, s.img, device, aug.scale_min), device, s.warmup, s.repeats, s.rounds
    )
    verdict = "" if t2t is None else ("keeps up" if rate >= t2t else "bottleneck")
    rec.row(
        f"decode_jpeg on {device.type}",
        "+ crop, flip, normalise on the device",
        _rate(rate),
        f">= step rate ({_rate(t2t)})" if t2t else "",
        verdict,
        images_per_s=rate,
        batch=s.batch,
    )
    rec.note(
        f"The generated JPEGs are {s.data_img} px; ImageNet's average about 470 x 390, so decoding real "
        "images costs more than here. RandAugment and random erasing are not on the device path."
    )


def _gpu_augment(datas: list[torch.Tensor], img: int, device: torch.device, scale_min: float) -> torch.Tensor:
    """Decode a batch of JPEGs on ``device``, random-resized-crop and flip each, normalise."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision.io import decode_jpeg
    from torchvision.transforms import RandomResizedCrop

    decoded = decode_jpeg(datas, device=device)
    out = torch.empty(len(decoded), 3, img, img, device=device)
    for i, image in enumerate(decoded):
        top, left, h, w = RandomResizedCrop.get_params(image, (scale_min, 1.0), (3 / 4, 4 / 3))
        crop = image[None, :, top : top + h, left : left + w].float()
        out[i] = F.interpolate(crop, size=(img, img), mode="bilinear", antialias=True, align_corners=False)[0]
    flip = torch.rand(len(decoded), device=device) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
    return (out - mean) / std


class _Stop(Exception):
    """Ends the resumed run once it has reported the step it was run for."""


def part_e(ctx: Context, rec: Recorder) -> None:
    """fit() through LocalSession: the loss falls, resuming at step N gives the same loss at N + 1, no NaN."""
    from pipeline.config import AugmentConfig, TrainConfig
    from pipeline.train.loop import LocalSession, RunSpec, fit

    s = ctx.sizes
    per_epoch = min((s.classes * s.train_per_class) // s.fit_batch, s.fit_steps)
    train = TrainConfig(
        img_size=s.fit_img,
        epochs=2,
        warmup_epochs=0.2,
        cooldown_epochs=0,
        batch_size=s.fit_batch,
        max_steps_per_epoch=per_epoch,
        lr=1e-3,
        weight_decay=0.05,
        drop_path_rate=0.0,
        num_workers=1,
        loader_workers=0,
        amp="bf16",
        compile=s.compile,
        checkpoint_every_steps=1,
        augment=AugmentConfig(scale_min=0.35),
    )
    spec = RunSpec(
        variant="gpu-suite",
        model=s.fit_model,
        train=train,
        shards=str(ctx.shards),
        num_classes=s.classes,
        model_kwargs=dict(s.model_kwargs),
    )
    checkpoint = ctx.scratch / "step.pt"

    class Recording(LocalSession):
        def __init__(self, stop_after: int | None = None, **kwargs: Any) -> None:
            super().__init__(device=ctx.device_name, **kwargs)
            self.losses: dict[int, float] = {}
            self.stop_after = stop_after

        def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
            super().report(metrics, state)
            step = int(metrics["epoch"]) * per_epoch + int(metrics.get("step", per_epoch))
            if "step_loss" in metrics:
                self.losses[step] = float(metrics["step_loss"])
            if step == per_epoch and "step" not in metrics and state is not None:
                torch.save(state, checkpoint)  # the end of epoch 1: a real checkpoint, on disk
            if self.stop_after is not None and step >= self.stop_after:
                raise _Stop

    tic = time.perf_counter()
    whole = Recording()
    fit(spec, whole)
    whole_s = time.perf_counter() - tic
    _free(ctx.device)
    resumed = Recording(stop_after=per_epoch + 1, resume=torch.load(checkpoint, weights_only=True))
    with contextlib.suppress(_Stop):
        fit(spec, resumed)
    losses = [whole.losses[k] for k in sorted(whole.losses)]
    window = max(1, len(losses) // 10)
    early, late = sum(losses[:window]) / window, sum(losses[-window:]) / window
    after = per_epoch + 1
    same = resumed.losses.get(after)
    weights = whole.state["model"] if whole.state else {}
    finite = (
        all(math.isfinite(x) for x in losses)
        and all(math.isfinite(m[k]) for m in whole.history for k in ("train_loss", "val_loss") if k in m)
        and all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    )
    rec.checks.update(
        {
            "loss falls": late < early,
            f"step {after} loss equal after resume": same is not None and same == whole.losses.get(after),
            "no NaN/inf (losses, weights)": finite,
        }
    )
    total = 2 * per_epoch
    rec.row(
        s.fit_model,
        f"fit, bf16{' + compile' if s.compile else ''}, {total} steps",
        f"loss {early:.3f} -> {late:.3f} (first/last {window} steps)",
        "falls",
        "passed" if late < early else "FAILED",
        early=early,
        late=late,
        losses=losses,
        seconds=whole_s,
        val_loss=[m.get("val_loss") for m in whole.history if "val_loss" in m],
    )
    resumed_ok = rec.checks[f"step {after} loss equal after resume"]
    rec.row(
        s.fit_model,
        f"checkpoint at step {per_epoch}, resumed",
        f"step {after}: {whole.losses.get(after)!r} vs {same!r}",
        "equal",
        "passed" if resumed_ok else "FAILED",
        uninterrupted=whole.losses.get(after),
        resumed=same,
    )
    rec.row(
        s.fit_model,
        "bf16" if ctx.device.type == "cuda" else "fp32 (fit's bf16 is CUDA-only)",
        "all finite" if finite else "NaN or inf found",
        "no NaN",
        "passed" if finite else "FAILED",
        finite=finite,
    )
    rec.note(
        "loader_workers 0: a resumed run then draws the same augmentation as the uninterrupted one "
        "(worker processes seed themselves when the loader starts)."
    )


STEPS: dict[str, Callable[[Context, Recorder], None]] = {
    "probe": probe,
    "data": make_data,
    "a": part_a,
    "b": part_b,
    "c": part_c,
    "d": part_d,
    "e": part_e,
}
