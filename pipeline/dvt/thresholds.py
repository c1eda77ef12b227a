"""Exit thresholds for DVT (Wang et al., "Not All Images are Worth 16x16 Words: Dynamic Transformers
for Efficient Image Recognition", arXiv:2105.15075), found the MSDNet way the authors' code does.

A sample leaves at the first stage ``k`` whose maximum softmax probability reaches ``eta_k``; the last
stage answers the rest (``eta_K = -inf``). For target exit proportions ``p_k`` the thresholds are
calibrated on held-out samples: sort by stage-``k`` confidence, skip the samples that already left,
and set ``eta_k`` to the confidence of the ``floor(n * p_k)``-th remaining one. Sweeping
``p_k ∝ q^k`` for ``q = i / 20, i = 1..59`` traces an accuracy-versus-average-MACs curve, from which
:func:`best_under_budget` picks the most accurate setting that fits a budget.

The calibration images are drawn with a seed (:func:`holdout_split`; the ``tune_dvt`` stage draws
them from the training split, as the authors do, or from part of the validation split), so unlike
the authors' script the thresholds are reproducible. Everything here is numpy on arrays shaped
(stages, samples[, classes]); :mod:`pipeline.dvt.inference` produces them from a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CurvePoint",
    "ThresholdEval",
    "best_under_budget",
    "budget_curve",
    "calibrate_thresholds",
    "evaluate_thresholds",
    "exit_proportions",
    "exit_stages",
    "holdout_split",
    "proportion_sweep",
    "softmax",
]


def holdout_split(num_samples: int, holdout: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(num_samples)`` into a subset and the rest.

    Args:
        num_samples: Size of the set to split.
        holdout: Held-out samples: a count (int) or a fraction in (0, 1) (float).
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        ``(subset, rest)``, each sorted.
    """
    if isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"a held-out fraction must lie in (0, 1), got {holdout}")
        holdout = round(holdout * num_samples)
    if not 0 <= holdout <= num_samples:
        raise ValueError(f"cannot hold out {holdout} of {num_samples} samples")
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[:holdout]), np.sort(order[holdout:])


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the confidences the thresholds compare against)."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def exit_proportions(q: float, num_stages: int = 3) -> np.ndarray:
    """Target exit proportions ``p_k ∝ q^k`` (k = 1..K), normalised to sum to 1."""
    weights = q ** np.arange(1, num_stages + 1, dtype=np.float64)
    return weights / weights.sum()


def proportion_sweep(
    num_stages: int = 3, steps: int = 59, denominator: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' sweep: ``q = i / denominator`` for ``i = 1..steps``.

    Returns:
        ``q`` (steps,) and the proportions (steps, num_stages). Small ``q`` sends most samples out at
        stage 1 (cheap); large ``q`` keeps most for the last stage.
    """
    qs = np.arange(1, steps + 1, dtype=np.float64) / denominator
    return qs, np.stack([exit_proportions(q, num_stages) for q in qs])


def calibrate_thresholds(confidences: np.ndarray, proportions: Sequence[float]) -> np.ndarray:
    """MSDNet/DVT thresholds that let ``proportions[k]`` of the samples exit at stage ``k``.

    For each stage but the last, samples that have not exited yet are ranked by their stage-``k``
    confidence and ``eta_k`` is the confidence of the ``floor(n * p_k)``-th of them (``n`` is the
    number of all samples); everything at or above it exits. When that count is 0 or exceeds the
    samples left, nobody exits there (``eta_k = +inf``, the authors' 1e8). The last threshold is -inf.

    Args:
        confidences: Maximum softmax probability per stage and sample (stages, samples).
        proportions: Target fraction of the samples leaving at each stage (one per stage).

    Returns:
        Thresholds (stages,).
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    num_stages, num_samples = confidences.shape
    if len(proportions) != num_stages:
        raise ValueError(f"{len(proportions)} proportions for {num_stages} stages")
    thresholds = np.full(num_stages, np.inf)
    exited = np.zeros(num_samples, dtype=bool)
    for k in range(num_stages - 1):
        count = math.floor(num_samples * proportions[k])
        order = np.argsort(-confidences[k], kind="stable")
        remaining = order[~exited[order]]
        if 1 <= count <= remaining.size:
            thresholds[k] = confidences[k, remaining[count - 1]]
        exited |= confidences[k] >= thresholds[k]
    thresholds[-1] = -np.inf
    return thresholds


def exit_stages(confidences: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The stage each sample answers at: the first ``k`` with confidence >= ``eta_k``.

    Args:
        confidences: (stages, samples).
        thresholds: One per stage (or one per stage but the last); the last stage always answers.

    Returns:
        0-based exit stage per sample (samples,).
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    num_stages = confidences.shape[0]
    thresholds = np.asarray(thresholds, dtype=np.float64)[: num_stages - 1]
    if thresholds.size != num_stages - 1:
        raise ValueError(f"{thresholds.size} thresholds for {num_stages} stages")
    leaves = np.vstack([confidences[:-1] >= thresholds[:, None], np.ones((1, confidences.shape[1]), bool)])
    return leaves.argmax(axis=0)


@dataclass(frozen=True)
class ThresholdEval:
    """How a set of thresholds does on labelled samples.

    Attributes:
        accuracy: Top-1 (%) of the answers.
        avg_macs: Mean MACs per sample (each pays the cumulative cost of its exit stage).
        exit_fractions: Fraction of the samples answering at each stage.
    """

    accuracy: float
    avg_macs: float
    exit_fractions: np.ndarray


def evaluate_thresholds(
    probs: np.ndarray, labels: np.ndarray, stage_macs: Sequence[float], thresholds: Sequence[float]
) -> ThresholdEval:
    """Accuracy, average MACs and exit fractions of ``thresholds`` on every stage's softmax outputs.

    Args:
        probs: Softmax probabilities (stages, samples, classes).
        labels: True classes (samples,).
        stage_macs: MACs of each stage alone; exiting at ``k`` costs the sum of stages ``0..k``.
        thresholds: One per stage (the last is ignored: that stage always answers).

    Returns:
        The evaluation.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    exits = exit_stages(probs.max(axis=-1), thresholds)
    predictions = probs.argmax(axis=-1)[exits, np.arange(exits.size)]
    cumulative = np.cumsum(np.asarray(stage_macs, dtype=np.float64))
    fractions = np.bincount(exits, minlength=probs.shape[0]) / exits.size
    return ThresholdEval(
        accuracy=100.0 * float(np.mean(predictions == labels)),
        avg_macs=float(np.mean(cumulative[exits])),
        exit_fractions=fractions,
    )


@dataclass(frozen=True)
class CurvePoint:
    """One setting of the sweep and how it does.

    Attributes:
        q: Ratio of the proportions ``p_k ∝ q^k``.
        proportions: Target exit proportions the thresholds were calibrated for.
        thresholds: Calibrated thresholds (the last is -inf).
        accuracy: Top-1 (%) on the evaluation samples.
        avg_macs: Mean MACs per evaluation sample.
        exit_fractions: Fraction of the evaluation samples leaving at each stage.
    """

    q: float
    proportions: np.ndarray
    thresholds: np.ndarray
    accuracy: float
    avg_macs: float
    exit_fractions: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and lists (for MLflow, JSON, Ray Tune); -inf stays ``float('-inf')``."""
        return {
            "q": self.q,
            "proportions": self.proportions.tolist(),
            "thresholds": self.thresholds.tolist(),
            "accuracy": self.accuracy,
            "avg_macs": self.avg_macs,
            "exit_fractions": self.exit_fractions.tolist(),
        }


def budget_curve(
    calib_probs: np.ndarray,
    eval_probs: np.ndarray,
    eval_labels: np.ndarray,
    stage_macs: Sequence[float],
    qs: Sequence[float] | None = None,
) -> list[CurvePoint]:
    """Accuracy versus average MACs over the proportions sweep.

    Thresholds are calibrated on ``calib_probs`` (no labels needed) and evaluated on
    ``eval_probs``/``eval_labels``: other images, as the authors calibrate on training images and
    report on validation images.

    Args:
        calib_probs: Softmax probabilities of the held-out samples (stages, samples, classes).
        eval_probs: Softmax probabilities of the evaluation samples (stages, samples, classes).
        eval_labels: True classes of the evaluation samples.
        stage_macs: MACs of each stage alone.
        qs: Ratios to sweep; :func:`proportion_sweep`'s 1/20 .. 59/20 when None.

    Returns:
        One point per ``q``, in sweep order.
    """
    num_stages = np.asarray(calib_probs).shape[0]
    if qs is None:
        qs, _ = proportion_sweep(num_stages)
    calib_conf = np.asarray(calib_probs).max(axis=-1)
    points = []
    for q in qs:
        proportions = exit_proportions(float(q), num_stages)
        thresholds = calibrate_thresholds(calib_conf, proportions)
        result = evaluate_thresholds(eval_probs, eval_labels, stage_macs, thresholds)
        points.append(
            CurvePoint(
                q=float(q),
                proportions=proportions,
                thresholds=thresholds,
                accuracy=result.accuracy,
                avg_macs=result.avg_macs,
                exit_fractions=result.exit_fractions,
            )
        )
    return points


def best_under_budget(curve: Sequence[CurvePoint], budget_macs: float) -> CurvePoint:
    """The most accurate point whose average MACs fit the budget (the cheaper one on a tie).

    Raises:
        ValueError: When no point fits, naming the cheapest.
    """
    affordable = [point for point in curve if point.avg_macs <= budget_macs]
    if not affordable:
        cheapest = min((point.avg_macs for point in curve), default=float("nan"))
        raise ValueError(
            f"no threshold setting fits {budget_macs:.4g} MACs; the cheapest needs {cheapest:.4g}"
        )
    return max(affordable, key=lambda point: (point.accuracy, -point.avg_macs))
