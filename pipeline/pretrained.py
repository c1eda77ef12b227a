"""Evaluating a checkpoint from outside the study: the authors' releases, timm files, our own trainings.

:func:`resolve_checkpoint` turns what ``params.yaml``'s ``pretrained`` section (or ``--checkpoint``)
names into a local file: a path, an fsspec URI (``s3://...``), an MLflow run (``runs:/<id>/...`` or
``mlflow:<run id>``), or a training record ``results/<variant>.json`` of this study.
:func:`create_model` loads it the timm way (``pretrained=True`` with the file as
``pretrained_cfg_overlay``; :mod:`pipeline.models.checkpoints`). :func:`evaluate` runs a loader through
it and returns top-1, top-5, images/s, per-class counts and, for a DVT cascade, every exit's
probabilities for the threshold curve (:func:`dvt_curve`, :mod:`pipeline.dvt.thresholds`).
:func:`export_authors_t2t` writes a T2T-ViT in the authors' release format (the end-to-end check
evaluates one written from a demo training).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "class_names",
    "create_model",
    "data_config",
    "dvt_curve",
    "evaluate",
    "export_authors_t2t",
    "project_config",
    "resolve_checkpoint",
]

#: The artifact a train stage logs: its final (EMA, when on) weights and its run spec.
PROJECT_ARTIFACT = "checkpoint/model.pt"

_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _download_run(run_id: str, artifact: str, tracking_uri: str | None, cache: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    dst = cache / run_id
    dst.mkdir(parents=True, exist_ok=True)
    return Path(
        download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=tracking_uri
        )
    )


def resolve_checkpoint(
    ref: str, *, root: Path, tracking_uri: str | None = None, cache: Path | None = None
) -> tuple[Path, str | None]:
    """A local file for a checkpoint reference, and the MLflow run it came from (if any).

    Args:
        ref: A path (relative to ``root`` or absolute); an fsspec URI (``s3://b/x.pth.tar``); an MLflow
            artifact URI (``runs:/<run id>/checkpoint/model.pt``); ``mlflow:<run id>`` or a bare run
            id (that run's ``checkpoint/model.pt``); or a training record ``results/<variant>.json``.
        root: Repository root, for relative paths.
        tracking_uri: MLflow store of run references.
        cache: Folder for downloaded files (``<root>/.cache/checkpoints`` when None).

    Returns:
        The local file and the source run id (None for a plain file).

    Raises:
        FileNotFoundError: a local file or training record that does not exist, with what to do.
    """
    cache = cache or root / ".cache" / "checkpoints"
    if ref.startswith("runs:/"):
        run_id, _, artifact = ref.removeprefix("runs:/").partition("/")
        return _download_run(run_id, artifact or PROJECT_ARTIFACT, tracking_uri, cache), run_id
    bare = ref.removeprefix("mlflow:")
    if ref.startswith("mlflow:") or _RUN_ID.fullmatch(ref):
        return _download_run(bare, PROJECT_ARTIFACT, tracking_uri, cache), bare
    if "://" in ref:
        import fsspec

        local = cache / "uri" / Path(ref.split("://", 1)[1])
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            with fsspec.open(ref, "rb") as src, open(local.with_suffix(local.suffix + ".part"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            local.with_suffix(local.suffix + ".part").rename(local)
        return local, None
    path = Path(ref) if Path(ref).is_absolute() else root / ref
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: download it (docs/models.md lists where) or fix the path"
        )
    if path.suffix == ".json":
        import json

        record = json.loads(path.read_text())
        if "run_id" not in record:
            raise ValueError(f"{path} is not a training record of this study (no run_id)")
        return _download_run(record["run_id"], PROJECT_ARTIFACT, tracking_uri, cache), record["run_id"]
    return path, None


def project_config(path: Path) -> dict[str, Any] | None:
    """The run spec stored in one of this study's checkpoints (``config``), or None for other files."""
    from pipeline.models.checkpoints import read_checkpoint

    if path.suffix == ".safetensors":
        return None
    checkpoint = read_checkpoint(path)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) and "model" in config else None


def create_model(
    name: str,
    path: Path,
    *,
    img_size: int | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` from ``path``, in eval mode.

    For one of this study's checkpoints the stored run spec supplies the model's arguments
    (``model_kwargs``, image size, class count) unless given here.

    Raises:
        CheckpointError: the file is damaged, unsafe, or of another architecture (named).
        ValueError: the file is this study's checkpoint of another model.
    """
    import timm

    import pipeline.models  # noqa: F401 - registers the study's models

    kwargs: dict[str, Any] = {}
    config = project_config(path)
    if config is not None:
        if config["model"] != name:
            raise ValueError(f"checkpoint {path} is this study's {config['model']}, not {name}")
        kwargs.update(config.get("model_kwargs") or {})
        kwargs["img_size"] = config.get("train", {}).get("img_size", 224)
        kwargs["num_classes"] = config.get("num_classes", 1000)
    kwargs.update(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return model.eval()


def data_config(
    model: nn.Module, img_size: int | None = None, crop_pct: float | None = None
) -> dict[str, Any]:
    """timm's evaluation data config of ``model`` (its own crop and interpolation unless given)."""
    from timm.data import resolve_data_config

    size = img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    args: dict[str, Any] = {"input_size": (3, size, size)}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    return resolve_data_config(args, model=model)


def export_authors_t2t(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    *,
    arch: str,
    metric: float | None = None,
    epoch: int = 0,
    args: dict[str, Any] | None = None,
) -> Path:
    """Write a T2T-ViT state dict as the authors release theirs (a timm 0.3.4 training checkpoint).

    ``state_dict`` and ``state_dict_ema`` both hold the weights under the authors' names with the DDP
    ``module.`` prefix; ``args`` is an ``argparse.Namespace``.
    """
    from pipeline.models.checkpoints import authors_t2t_names

    weights = {f"module.{k}": v for k, v in authors_t2t_names(state_dict).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": epoch,
            "arch": arch,
            "state_dict": weights,
            "state_dict_ema": weights,
            "args": argparse.Namespace(model=arch, **(args or {})),
            "version": 2,
            "metric": metric,
        },
        path,
    )
    return path


@dataclass
class EvalResult:
    """One pass over an evaluation set."""

    top1: float
    top5: float
    images: int
    images_per_s: float
    correct: np.ndarray
    """Per class: images whose top-1 is right."""
    count: np.ndarray
    """Per class: images."""
    exits_top1: list[float] = field(default_factory=list)
    """Multi-exit models: top-1 (%) of every exit; the headline numbers are the last exit's."""
    probs: np.ndarray | None = None
    """Multi-exit models: softmax of every exit (exits, images, classes), for thresholds."""
    labels: np.ndarray | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    total: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Top-1/top-5 of ``model`` over ``loader`` (a DVT cascade: every exit), with a tqdm progress bar.

    images/s is the whole loop's rate, reading and decoding included, as timm's ``validate.py``.
    """
    from tqdm import tqdm

    device = torch.device(device)
    model.eval().to(device)
    correct = np.zeros(num_classes, dtype=np.int64)
    count = np.zeros(num_classes, dtype=np.int64)
    top5 = 0
    exit_hits: list[int] = []
    probs, labels = [], []
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)
    tic = time.perf_counter()
    for images, target in loader:
        output = model(images.to(device))
        target = target.to(device)
        exits = list(output) if isinstance(output, list | tuple) else [output]
        logits = exits[-1].float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit1 = (top[:, 0] == target).cpu().numpy()
        top5 += int((top == target[:, None]).any(dim=-1).sum())
        t = target.cpu().numpy()
        np.add.at(count, t, 1)
        np.add.at(correct, t, hit1.astype(np.int64))
        if len(exits) > 1:
            hits = [int((x.argmax(-1) == target).sum()) for x in exits]
            exit_hits = hits if not exit_hits else [a + b for a, b in zip(exit_hits, hits, strict=True)]
            probs.append(torch.stack([x.float().softmax(-1) for x in exits]).cpu().numpy())
            labels.append(t)
        bar.update(len(t))
        n = int(count.sum())
        bar.set_postfix(top1=f"{100 * correct.sum() / n:.2f}", top5=f"{100 * top5 / n:.2f}")
    bar.close()
    elapsed = time.perf_counter() - tic
    n = max(int(count.sum()), 1)
    return EvalResult(
        top1=100.0 * int(correct.sum()) / n,
        top5=100.0 * top5 / n,
        images=int(count.sum()),
        images_per_s=int(count.sum()) / elapsed if elapsed else float("nan"),
        correct=correct,
        count=count,
        exits_top1=[100.0 * h / n for h in exit_hits],
        probs=np.concatenate(probs, axis=1) if probs else None,
        labels=np.concatenate(labels) if labels else None,
    )


def dvt_curve(
    result: EvalResult, stage_macs: list[float], *, holdout_fraction: float = 0.5, seed: int = 0
) -> list[dict[str, Any]]:
    """Accuracy against average GMACs of a cascade's early exit, by this study's threshold code.

    Thresholds are calibrated on a seeded held-out part of the evaluated images and the curve is
    measured on the rest (:func:`pipeline.dvt.thresholds.budget_curve`), so no point is chosen on the
    images it reports.
    """
    from pipeline.dvt.thresholds import budget_curve, holdout_split

    if result.probs is None or result.labels is None:
        raise ValueError("the evaluation holds one exit only: not a DVT cascade")
    calib, rest = holdout_split(result.labels.shape[0], holdout_fraction, seed)
    points = budget_curve(result.probs[:, calib], result.probs[:, rest], result.labels[rest], stage_macs)
    return [{**p.to_dict(), "avg_gmacs": p.avg_macs / 1e9} for p in points]


def class_names(wnids: list[str]) -> list[str]:
    """Human names of ImageNet wnids from timm's ``ImageNetInfo`` (the wnid itself when unknown)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    known = set(info.label_names())
    return [info.label_name_to_description(w) if w in known else w for w in wnids]
