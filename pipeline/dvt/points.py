"""Operating points of a cascade: thresholds chosen on the calibration images, scored on both sets.

Every function that *chooses* here (:func:`best_within`, :func:`cheapest_reaching`) reads only the
``calib_*`` fields of :class:`~pipeline.dvt.records.OperatingPoint`; the reported fields are carried
along to be shown, never compared. Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.dvt.records import OperatingPoint
from pipeline.dvt.thresholds import (
    calibrate_thresholds,
    evaluate_thresholds,
    exit_proportions,
    proportion_sweep,
)

__all__ = ["best_within", "cheapest_reaching", "score_point", "sweep"]

_EPS = 1e-12


def score_point(
    thresholds: Sequence[float],
    calib: tuple[np.ndarray, np.ndarray],
    reported: tuple[np.ndarray, np.ndarray],
    stage_macs: Sequence[float],
    q: float | None = None,
) -> OperatingPoint:
    """``thresholds`` scored on the calibration images and on the reported images.

    Args:
        thresholds: One per stage (the last answers the rest).
        calib: Softmax outputs (stages, N, classes) and labels of the calibration images.
        reported: The same for the reported images.
        stage_macs: MACs of each stage alone.
        q: The sweep ratio, when the thresholds come from the sweep.
    """
    on_calib = evaluate_thresholds(*calib, stage_macs, thresholds)
    on_reported = evaluate_thresholds(*reported, stage_macs, thresholds)
    return OperatingPoint(
        thresholds=[float(t) for t in thresholds],
        calib_accuracy=on_calib.accuracy,
        calib_avg_gmacs=on_calib.avg_macs / 1e9,
        accuracy=on_reported.accuracy,
        avg_gmacs=on_reported.avg_macs / 1e9,
        exit_fractions=on_reported.exit_fractions.tolist(),
        q=q,
    )


def sweep(
    calib: tuple[np.ndarray, np.ndarray],
    reported: tuple[np.ndarray, np.ndarray],
    stage_macs: Sequence[float],
    qs: Sequence[float] | None = None,
) -> list[OperatingPoint]:
    """The MSDNet sweep (``p_k ∝ q^k``): thresholds calibrated on ``calib``'s confidences (no labels),
    each point scored on both sets. ``qs``: the authors' 1/20 .. 59/20 when None."""
    num_stages = calib[0].shape[0]
    if qs is None:
        qs, _ = proportion_sweep(num_stages)
    confidences = np.asarray(calib[0]).max(axis=-1)
    return [
        score_point(
            calibrate_thresholds(confidences, exit_proportions(float(q), num_stages)),
            calib,
            reported,
            stage_macs,
            q=float(q),
        )
        for q in qs
    ]


def best_within(points: Sequence[OperatingPoint], budget_gmacs: float) -> OperatingPoint | None:
    """The most accurate point on the calibration images whose calibration cost fits ``budget_gmacs``
    (the cheaper one on a tie); None when none fits."""
    fits = [p for p in points if p.calib_avg_gmacs <= budget_gmacs + _EPS]
    return max(fits, key=lambda p: (p.calib_accuracy, -p.calib_avg_gmacs), default=None)


def cheapest_reaching(points: Sequence[OperatingPoint], calib_accuracy: float) -> OperatingPoint:
    """The cheapest point whose calibration accuracy reaches ``calib_accuracy``; the most accurate
    point (on the calibration images) when none does."""
    reaching = [p for p in points if p.calib_accuracy >= calib_accuracy]
    if reaching:
        return min(reaching, key=lambda p: (p.calib_avg_gmacs, -p.calib_accuracy))
    return max(points, key=lambda p: (p.calib_accuracy, -p.calib_avg_gmacs))
