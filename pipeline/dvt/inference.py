"""Early-exit inference for DVT (Wang et al., "Not All Images are Worth 16x16 Words: Dynamic
Transformers for Efficient Image Recognition", arXiv:2105.15075).

:func:`early_exit` is true batched early exit: stage 1 runs on the whole batch, the samples whose
maximum softmax confidence reaches ``eta_1`` leave, and only the rest -- with only their rows of the
reuse tensors (:meth:`~pipeline.models.dvt.ReuseState.index_select`) -- go on to stage 2, and so on;
the last stage answers whoever is left. A batch therefore costs what its samples' exits cost, which
is what the paper's throughput numbers assume and what the authors' code, running every stage on
every image, cannot show.

:func:`all_stage_logits` is that "simulate" mode (every stage on every sample), used to calibrate
thresholds (:mod:`pipeline.dvt.thresholds`) and as the reference the early exit must reproduce.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.models.dvt import DynamicVisionTransformer

__all__ = ["EarlyExit", "all_stage_logits", "collect_stage_probs", "early_exit", "evaluate_early_exit"]


@dataclass(frozen=True)
class EarlyExit:
    """Per-sample outcome of early-exit inference.

    Attributes:
        predictions: Predicted class (N,).
        exits: 0-based stage that answered (N,).
        confidences: Maximum softmax probability of the answering stage (N,).
        macs: MACs spent on the sample: the cumulative cost up to its exit stage (N,), float64.
    """

    predictions: torch.Tensor
    exits: torch.Tensor
    confidences: torch.Tensor
    macs: torch.Tensor


class _EvalMode:
    """Puts a model in eval mode for a block and restores its previous mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _cumulative_macs(
    model: DynamicVisionTransformer, images: torch.Tensor, stage_macs: Sequence[float] | None
) -> torch.Tensor:
    if stage_macs is None:
        stage_macs = model.stage_macs(images.shape[-1])
    if len(stage_macs) != model.num_exits:
        raise ValueError(f"{len(stage_macs)} stage costs for {model.num_exits} stages")
    return torch.tensor(np.cumsum(np.asarray(stage_macs, dtype=np.float64)), dtype=torch.float64)


@torch.no_grad()
def early_exit(
    model: DynamicVisionTransformer,
    images: torch.Tensor,
    thresholds: Sequence[float],
    stage_macs: Sequence[float] | None = None,
) -> EarlyExit:
    """Classify a batch, each sample stopping at the first stage confident enough.

    The model runs in eval mode (its mode is restored afterwards). Sample ``i`` leaves stage ``k`` when
    ``max softmax >= thresholds[k]`` (compared in float64, as :func:`~pipeline.dvt.thresholds.exit_stages`
    does); the last stage answers everyone left whatever its threshold.

    Args:
        model: The cascade.
        images: A batch (N, C, H, W) on the model's device.
        thresholds: One per stage (or per stage but the last).
        stage_macs: MACs of each stage alone (``model.stage_macs()``); counted here when None.

    Returns:
        Predictions, exit stages, confidences and MACs per sample (on the images' device, MACs on CPU).
    """
    num_stages = model.num_exits
    if len(thresholds) not in (num_stages - 1, num_stages):
        raise ValueError(f"{len(thresholds)} thresholds for {num_stages} stages")
    cumulative = _cumulative_macs(model, images, stage_macs)
    batch, device = images.shape[0], images.device
    predictions = torch.empty(batch, dtype=torch.long, device=device)
    exits = torch.empty(batch, dtype=torch.long, device=device)
    confidences = torch.empty(batch, dtype=torch.float32, device=device)
    active = torch.arange(batch, device=device)  # original index of each sample still in the cascade
    x, state = images, None
    with _EvalMode(model):
        for k in range(num_stages):
            logits, state = model.forward_stage(k, x, state)
            confidence, prediction = logits.float().softmax(dim=-1).max(dim=-1)
            if k == num_stages - 1:
                leave = torch.ones_like(confidence, dtype=torch.bool)
            else:
                leave = confidence.double() >= float(thresholds[k])
            done = active[leave]
            predictions[done], exits[done], confidences[done] = prediction[leave], k, confidence[leave]
            stay = (~leave).nonzero().squeeze(1)
            if stay.numel() == 0:
                break
            active, x, state = active[stay], x.index_select(0, stay), state.index_select(stay)
    return EarlyExit(
        predictions=predictions, exits=exits, confidences=confidences, macs=cumulative[exits.cpu()]
    )


@torch.no_grad()
def all_stage_logits(model: DynamicVisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Every stage's logits on every image, in eval mode: (stages, N, classes) -- the simulate mode."""
    with _EvalMode(model):
        return torch.stack(model(images))


@torch.no_grad()
def collect_stage_probs(
    model: DynamicVisionTransformer, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of every stage over a loader, for :mod:`pipeline.dvt.thresholds`.

    Returns:
        Probabilities (stages, samples, classes) as float32 and labels (samples,).
    """
    probs, labels = [], []
    for images, target in loader:
        logits = all_stage_logits(model, images.to(device))
        probs.append(logits.float().softmax(dim=-1).cpu().numpy())
        labels.append(target.cpu().numpy())
    return np.concatenate(probs, axis=1), np.concatenate(labels)


@torch.no_grad()
def evaluate_early_exit(
    model: DynamicVisionTransformer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    thresholds: Sequence[float],
    stage_macs: Sequence[float],
    device: torch.device,
) -> dict[str, Any]:
    """Top-1, average MACs, exit fractions and measured throughput of early exit over a loader.

    Returns:
        ``{"accuracy": %, "avg_macs": float, "exit_fractions": list, "images_per_s": float}``.
    """
    correct = total = 0
    macs = 0.0
    counts = np.zeros(model.num_exits, dtype=np.int64)
    elapsed = 0.0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        result = early_exit(model, images, thresholds, stage_macs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - tic
        correct += int((result.predictions == target).sum())
        total += target.numel()
        macs += float(result.macs.sum())
        counts += np.bincount(result.exits.cpu().numpy(), minlength=model.num_exits)
    total = max(total, 1)
    return {
        "accuracy": 100.0 * correct / total,
        "avg_macs": macs / total,
        "exit_fractions": (counts / total).tolist(),
        "images_per_s": total / elapsed if elapsed else float("nan"),
    }
