"""What a ``tune_dvt`` stage hands to the report: one typed record per cascade, one writer, one reader.

:class:`TuneRecord` is written by :func:`TuneRecord.write` to ``results/dvt/<variant>/best.yaml`` and
read back only by :func:`TuneRecord.read`; the report takes every number from it (``curve.csv`` and
``metrics.json`` beside it are for ``dvc plots`` / ``dvc metrics`` and are never read back).

Two sets of images appear throughout, and the names say which: ``calib_*`` fields are measured on
the calibration images, which every choice (thresholds, budget points, the operating point matching
the static backbone) looks at; the plain fields (``accuracy``, ``avg_gmacs``, ``exit_fractions``) are
measured on the reported images, which no choice looks at.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.storage import atomic_write

__all__ = [
    "OperatingPoint",
    "ReuseAblation",
    "ReuseTrial",
    "SpeedRow",
    "StaticScore",
    "Throughput",
    "TuneRecord",
]


@dataclass(frozen=True)
class OperatingPoint:
    """One setting of the exit thresholds, chosen on the calibration images and scored on both sets.

    Attributes:
        thresholds: ``eta_1 .. eta_K`` (the last is -inf: that stage answers the rest).
        calib_accuracy: Top-1 (%) on the calibration images.
        calib_avg_gmacs: Mean GMACs per calibration image.
        accuracy: Top-1 (%) on the reported images.
        avg_gmacs: Mean GMACs per reported image.
        exit_fractions: Share of the reported images answering at each stage.
        q: The MSDNet sweep's ratio (``p_k ∝ q^k``) when the point comes from the sweep.
    """

    thresholds: list[float]
    calib_accuracy: float
    calib_avg_gmacs: float
    accuracy: float
    avg_gmacs: float
    exit_fractions: list[float]
    q: float | None = None


@dataclass(frozen=True)
class ReuseTrial:
    """One combination of the reuse ablation, trained from scratch; top-1 on the validation split."""

    feature_reuse: bool
    relation_reuse: bool
    val_top1: float
    exit_top1: list[float]
    run_id: str

    @property
    def metric_key(self) -> str:
        """The combination's MLflow metric suffix, e.g. ``feature1_relation0``."""
        return f"feature{int(self.feature_reuse)}_relation{int(self.relation_reuse)}"


@dataclass(frozen=True)
class ReuseAblation:
    """The ablation's budget per trial and its trials (a measurement: nothing is chosen from it)."""

    epochs: int
    steps_per_epoch: int | None
    workers: int
    trials: list[ReuseTrial]


@dataclass(frozen=True)
class StaticScore:
    """The static backbone of the cascade's family, scored by the tune stage on the same images."""

    variant: str
    model: str
    run_id: str
    gmacs: float
    calib_accuracy: float
    accuracy: float


@dataclass(frozen=True)
class SpeedRow:
    """Measured images/s of one way of running a model on the same batch of reported images.

    Attributes:
        model: ``early_exit``, ``simulate_all`` (every stage on every image, exits applied afterwards,
            as the authors' code does) or ``static`` (the backbone).
        point: The operating point timed: ``budget``, ``match_static`` or ``full`` (static).
        images_per_s: Median over the repeats.
        top1: Top-1 (%) of that model at that point on all reported images.
        avg_gmacs: Mean GMACs per image on the timed batch.
        exit_fractions: Share of the timed batch answering at each stage (empty for the static model).
    """

    model: Literal["early_exit", "simulate_all", "static"]
    point: Literal["budget", "match_static", "full"]
    images_per_s: float
    top1: float | None
    avg_gmacs: float
    exit_fractions: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Throughput:
    """Where and how the speed was measured, and the rows."""

    device: str
    dtype: str
    threads: int
    batch_size: int
    warmup: int
    repeats: int
    rows: list[SpeedRow]


@dataclass(frozen=True)
class TuneRecord:
    """Everything one ``tune_dvt@<variant>`` stage found.

    Attributes:
        variant: The cascade's variant name; ``model`` its registered model.
        run_id: The tuning's MLflow run; ``trained_run_id`` the training run it tuned.
        img_size: Input side of the trained cascade.
        calibration: ``train`` or ``val`` (:class:`~pipeline.config.DVTConfig`).
        calibration_images: Images that calibrated; ``reported_images``: images reported.
        budget_gmacs: The stage's budget.
        stage_gmacs: GMACs of each stage alone (exiting at ``k`` costs the sum up to ``k``).
        exit_top1: Top-1 (%) of each exit alone on the reported images.
        curve: The MSDNet sweep, calibrated and scored on both sets.
        msdnet: The sweep point chosen for the budget; ``optuna``: Optuna's thresholds for it.
        match_static: The cheapest sweep point at least as accurate as the static backbone on the
            calibration images (None without a backbone; the most accurate point if none is).
        static: The backbone scored on the same images (None when none is configured).
        reuse: The reuse ablation (None when the profile does not ask for it on this cascade).
        throughput: The measured speed (None when not measured).
    """

    variant: str
    model: str
    run_id: str
    trained_run_id: str
    img_size: int
    calibration: Literal["train", "val"]
    calibration_images: int
    reported_images: int
    budget_gmacs: float
    stage_gmacs: list[float]
    exit_top1: list[float]
    curve: list[OperatingPoint]
    msdnet: OperatingPoint
    optuna: OperatingPoint
    match_static: OperatingPoint | None = None
    static: StaticScore | None = None
    reuse: ReuseAblation | None = None
    throughput: Throughput | None = None

    @property
    def full_gmacs(self) -> float:
        """Cost of an image that runs every stage."""
        return float(sum(self.stage_gmacs))

    def write(self, path: Path) -> None:
        """The record as YAML (``-inf`` thresholds as ``-.inf``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def read(cls, path: Path) -> TuneRecord:
        """Read a record :meth:`write` wrote.

        Raises:
            ValueError: The file is not such a record, naming the file and the stage to re-run.
        """
        try:
            raw = yaml.safe_load(path.read_text())
            return _build(cls, raw)
        except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError) as err:
            raise ValueError(
                f"{path} is not a tune_dvt record ({err}); re-run the tune_dvt stage that writes it"
            ) from None


def _build(kind: Any, value: Any) -> Any:
    """``value`` (plain YAML data) as an instance of the annotation ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if value is None else _build(options[0], value)
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_build(item, v) for v in value]
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ValueError(f"{value!r} is not one of {typing.get_args(kind)}")
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping for {kind.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind)}
        stray = sorted(set(value) - known)
        if stray:
            raise KeyError(f"unknown field(s) {stray} of {kind.__name__}")
        return kind(**{k: _build(hints[k], v) for k, v in value.items()})
    if kind is float:
        return float(value) if value is not None else math.nan
    if kind in (int, str, bool) and not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value
