"""What the report reads: the current DVC outputs, and the MLflow runs they name.

Only ``results/<variant>.json`` of the variants in the current params are read, each naming the
MLflow run that produced it, and ``results/dvt/<cascade>/best.yaml``, each cascade's tuning record
naming its run; nothing is searched for in the store, so stale or unrelated runs (an older training
of the same variant, other experiments) never appear. A variant without a results file is reported
as missing; a results file whose run is gone from the store is an error, as the study cannot be
traced any more.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.dvt.records import TuneRecord
from pipeline.stats import Spread, spread

log = logging.getLogger(__name__)

#: The record each tune_dvt stage writes under ``results/dvt/<cascade>/``.
RECORD = "best.yaml"

#: Where ``./run ui`` serves the MLflow UI; ``MLFLOW_UI_URL`` overrides it.
DEFAULT_UI_URL = "http://127.0.0.1:5000"

#: Per-epoch metrics whose history the report draws (logged at step = epoch by the train stage).
HISTORY_KEYS = ("val_top1", "val_top5", "val_loss", "train_loss")

#: Which figure of a training the tables show (``report.epoch``): the last epoch's or the best one's.
Epoch = Literal["last", "best"]

#: Model kwargs that leave the architecture (hence parameters and MACs) as the paper built it.
REGULARISATION_KWARGS = frozenset(
    {"drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate"}
)


class ReportError(RuntimeError):
    """A results file names an MLflow run the store no longer has (or is unreadable); names both."""


def ui_base() -> str:
    """The MLflow UI the report links to: ``MLFLOW_UI_URL`` or ``./run ui``'s address."""
    return (os.environ.get("MLFLOW_UI_URL", "").strip() or DEFAULT_UI_URL).rstrip("/")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@dataclass(frozen=True)
class Measured:
    """One finished training as MLflow records it.

    Attributes:
        run_id: The MLflow run named by ``results/<variant>.json``.
        experiment_id: Its experiment (for the UI link).
        status: The run's status (``FINISHED`` for every run a train stage completed).
        model: The timm model name the run trained (tag ``model``).
        model_kwargs: The overrides it was built with (params ``model_kwargs.*``).
        img_size: Training (and evaluation) resolution, px.
        epochs: Epochs trained.
        metrics: Latest value of every metric (the last epoch's for per-epoch ones).
        history: Per-epoch ``(epoch, value)`` of :data:`HISTORY_KEYS` and ``val_top1_exit<k>``.
        tags: The run's tags (git commit, params hash, ...).
        url: The run's page in the MLflow UI.
        figure: What ``top1``/``top5`` in ``metrics`` are (:func:`with_figures`).
        runs: Every seed's run id, first to last, when the variant was trained over several seeds;
            ``metrics`` then hold the mean over them and ``spread`` the mean, std and n
            (:func:`merge_seeds`); ``run_id``, ``url``, ``history`` and ``tags`` are the first seed's.
        spread: Per metric, its :class:`~pipeline.stats.Spread` over the seeds (n = 1: one run).
    """

    run_id: str
    experiment_id: str
    status: str
    model: str
    model_kwargs: dict[str, Any]
    img_size: int | None
    epochs: int | None
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    tags: dict[str, str]
    url: str
    figure: str = ""
    runs: tuple[str, ...] = ()
    spread: dict[str, Spread] = field(default_factory=dict)

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return None if value is None or math.isnan(value) else float(value)

    @property
    def n(self) -> int:
        """How many seeds the figures are over."""
        return max(len(self.runs), 1)

    def spread_text(self, key: str, digits: int = 2) -> str | None:
        """``mean ± std (n=3)`` of a metric over the seeds; None for a single run."""
        s = self.spread.get(key)
        return s.text(digits) if s is not None and s.n > 1 else None

    @property
    def num_exits(self) -> int:
        """1 for a static model; the number of exits for a multi-exit one (DVT)."""
        return sum(1 for k in self.metrics if k.startswith("val_top1_exit")) or 1

    @property
    def kwargs_text(self) -> str:
        """``model_kwargs`` as ``key=value, ...``."""
        return ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())

    @property
    def paper_architecture(self) -> bool:
        """Whether the model is built exactly as its registered name says (no size overrides)."""
        return set(self.model_kwargs) <= REGULARISATION_KWARGS


@dataclass(frozen=True)
class VariantResult:
    """One variant of the current params: its results file and run, or missing."""

    variant: str
    results_file: Path
    measured: Measured | None
    """None when the variant has no results file yet (its train stage has not run)."""

    @property
    def status(self) -> Literal["measured", "missing"]:
        return "missing" if self.measured is None else "measured"


@dataclass(frozen=True)
class DVTResult:
    """One ``tune_dvt@<variant>`` stage's record (``results/dvt/<variant>/best.yaml``) and its MLflow run.

    ``status`` is ``missing`` without the record, and ``stale`` when the tuning was done on a training
    run (of the cascade or of its static backbone) other than the one ``results/<variant>.json`` now
    names, or on a variant no longer trained; only ``ok`` results are reported.
    """

    status: Literal["ok", "missing", "stale"]
    variant: str
    note: str = ""
    record: TuneRecord | None = None
    url: str = ""
    experiment_id: str = ""

    @property
    def run_id(self) -> str:
        return self.record.run_id if self.record is not None else ""

    def trial_url(self, base: str, run_id: str) -> str:
        """The MLflow UI page of one of the tuning's child runs."""
        return run_url(base, self.experiment_id, run_id) if run_id else ""


@dataclass(frozen=True)
class Study:
    """Everything the report shows, read once."""

    variants: list[VariantResult]
    dvt: list[DVTResult]
    """One per cascade of ``dvt.variants``, in that order."""
    tracking_uri: str
    ui_base: str
    experiment: str = ""
    epoch: Epoch = "last"
    """``report.epoch``: which figure of each training the tables show."""

    @property
    def measured(self) -> list[tuple[str, Measured]]:
        return [(v.variant, v.measured) for v in self.variants if v.measured is not None]

    def find(self, variant: str) -> VariantResult | None:
        return next((v for v in self.variants if v.variant == variant), None)

    @property
    def tuned(self) -> list[DVTResult]:
        """The cascades whose tuning is current (status ``ok``)."""
        return [d for d in self.dvt if d.status == "ok"]


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _model_kwargs(params: dict[str, str]) -> dict[str, Any]:
    """``model_kwargs`` as the train stage flattened it into MLflow params."""
    prefix = "model_kwargs."
    return {k.removeprefix(prefix): _parse_value(v) for k, v in params.items() if k.startswith(prefix)}


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _get_run(client: Any, run_id: str, source: Path, tracking_uri: str, what: str) -> Any:
    """The run named by ``source``, or a :class:`ReportError` naming both."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ReportError(
            f"{source} names MLflow run {run_id}, which is not in the store {tracking_uri} "
            f"({err.error_code}); re-run {what} or point MLFLOW_TRACKING_URI at the store that has it"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise ReportError(
            f"{source} names MLflow run {run_id}, which is deleted in the store {tracking_uri}; "
            f"restore it (mlflow runs restore --run-id {run_id}) or re-run {what}"
        )
    return run


def read_measured(
    client: Any, run_id: str, *, source: Path, tracking_uri: str, base: str, what: str
) -> Measured:
    """Fetch one run by id: its latest metrics, per-epoch history, params and tags."""
    run = _get_run(client, run_id, source, tracking_uri, what)
    metrics = dict(run.data.metrics)
    keys = [k for k in HISTORY_KEYS if k in metrics]
    keys += sorted(k for k in metrics if k.startswith("val_top1_exit"))
    history = {}
    for key in keys:
        points = client.get_metric_history(run_id, key)
        # One value per epoch; a resumed run never logs an epoch twice, but keep the latest if it did.
        by_step = {m.step: m.value for m in sorted(points, key=lambda m: (m.step, m.timestamp))}
        history[key] = sorted(by_step.items())
    params = dict(run.data.params)
    tags = dict(run.data.tags)
    return Measured(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        model=tags.get("model") or params.get("model", ""),
        model_kwargs=_model_kwargs(params),
        img_size=_int_or_none(params.get("train.img_size")),
        epochs=_int_or_none(params.get("train.epochs")),
        metrics={k: float(v) for k, v in metrics.items()},
        history=history,
        tags=tags,
        url=run_url(base, run.info.experiment_id, run_id),
    )


def with_figures(m: Measured, epoch: Epoch = "last") -> Measured:
    """``m`` with ``top1``/``top5`` set to the figure the report shows, and ``figure`` saying which.

    ``last``: the last epoch of the reported weights, the EMA's where the run kept an EMA
    (``ema_val_*``, the weights the authors evaluate), else the raw ones (``val_*``). ``best``: the
    best validation epoch of those weights (``best_val_*``); it is picked on the images it is
    measured on, so it flatters the model.
    """
    ema = "ema_val_top1" in m.metrics
    weights = "EMA weights" if ema else "raw weights"
    if epoch == "best":
        keys, figure = ("best_val_top1", "best_val_top5"), f"best validation epoch, {weights}"
    else:
        keys = ("ema_val_top1", "ema_val_top5") if ema else ("val_top1", "val_top5")
        figure = f"last epoch, {weights}"
    metrics = dict(m.metrics)
    for name, key in zip(("top1", "top5"), keys, strict=True):
        metrics.pop(name, None)
        if key in m.metrics:
            metrics[name] = m.metrics[key]
    return replace(m, metrics=metrics, figure=figure)


def merge_seeds(runs: Sequence[Measured]) -> Measured:
    """One variant's runs over several seeds as one :class:`Measured`: the first run's identity and
    history, every metric that all runs have as its mean, and its spread (mean, std, n)."""
    first = runs[0]
    keys = [k for k in first.metrics if all(k in r.metrics for r in runs)]
    spreads = {k: s for k in keys if (s := spread(r.metrics[k] for r in runs)) is not None}
    figures = {r.figure for r in runs}
    return replace(
        first,
        metrics={k: s.mean for k, s in spreads.items()},
        spread=spreads,
        runs=tuple(r.run_id for r in runs) if len(runs) > 1 else (),
        figure=first.figure if len(figures) == 1 else "mixed: " + "; ".join(sorted(figures)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not a readable results file ({err})") from None
    if not isinstance(record, dict) or not record.get("run_id"):
        raise ReportError(f"{path} names no MLflow run (no run_id); re-run the stage that writes it")
    return record


def read_variant(
    client: Any, results_dir: Path, variant: str, tracking_uri: str, base: str, epoch: Epoch = "last"
) -> VariantResult:
    """``results/<variant>.json`` and its runs (one per seed, merged by :func:`merge_seeds`), with
    the ``epoch`` figure; ``measured`` is None when the file is missing."""
    path = results_dir / f"{variant}.json"
    if not path.is_file():
        log.warning("%s is missing: train@%s has not run; reported as missing", path, variant)
        return VariantResult(variant, path, None)
    record = _read_json(path)
    run_ids = [r["run_id"] for r in record.get("runs", [])] or [record["run_id"]]
    runs = []
    for run_id in run_ids:
        measured = read_measured(
            client, run_id, source=path, tracking_uri=tracking_uri, base=base, what=f"train@{variant}"
        )
        tagged = measured.tags.get("variant")
        if tagged not in (None, variant):
            raise ReportError(f"{path} names MLflow run {run_id}, which trained variant {tagged!r}")
        if measured.status != "FINISHED":
            log.warning("%s: MLflow run %s is %s, not FINISHED", variant, run_id, measured.status)
        runs.append(with_figures(measured, epoch))
    return VariantResult(variant, path, merge_seeds(runs))


def read_dvt(
    client: Any,
    results_dir: Path,
    cascade: str,
    variants: dict[str, VariantResult],
    tracking_uri: str,
    base: str,
) -> DVTResult:
    """One cascade's tuning record if present and made from the current trainings it used."""
    path = results_dir / "dvt" / cascade / RECORD
    if not path.is_file():
        log.warning("%s is missing: tune_dvt@%s has not run; reported as missing", path, cascade)
        return DVTResult("missing", cascade, note=f"{path} is missing: tune_dvt@{cascade} has not run")
    try:
        record = TuneRecord.read(path)
    except ValueError as err:
        raise ReportError(str(err)) from None
    run = _get_run(client, record.run_id, path, tracking_uri, f"tune_dvt@{cascade}")
    url = run_url(base, run.info.experiment_id, record.run_id)
    used = {cascade: record.trained_run_id}
    if record.static is not None:
        used[record.static.variant] = record.static.run_id
    for variant, run_id in used.items():
        current = variants.get(variant)
        if current is None or current.measured is None:
            note = f"tuned with {variant!r}, which is not a trained variant of the current params"
        elif current.measured.run_id != run_id:
            note = (
                f"tuned with training run {run_id} of {variant}, but {current.results_file.name} names run "
                f"{current.measured.run_id}: re-run tune_dvt@{cascade}"
            )
        else:
            continue
        log.warning("%s: %s; reported as stale", path, note)
        return DVTResult("stale", cascade, note=note, url=url, experiment_id=run.info.experiment_id)
    return DVTResult("ok", cascade, record=record, url=url, experiment_id=run.info.experiment_id)


def collect(
    results_dir: Path,
    variants: Sequence[str],
    tracking_uri: str,
    *,
    cascades: Sequence[str] = (),
    base: str | None = None,
    epoch: Epoch = "last",
) -> Study:
    """Read the current study: one :class:`VariantResult` per variant (in params order) and one
    :class:`DVTResult` per tuned cascade.

    Args:
        results_dir: The train stages' ``results/`` folder (with ``dvt/<cascade>/`` from tune_dvt).
        variants: The variants of the current params, in order.
        cascades: ``dvt.variants`` of the current params.
        tracking_uri: The MLflow store the runs were logged to.
        base: MLflow UI address for links (default :func:`ui_base`).
        epoch: ``report.epoch``: the last epoch's figures or the best epoch's (:func:`with_figures`).

    Raises:
        ReportError: A results file names a run the store does not have, naming the file and the run.
    """
    from mlflow.tracking import MlflowClient

    base = (base or ui_base()).rstrip("/")
    client = MlflowClient(tracking_uri)
    results = [read_variant(client, results_dir, v, tracking_uri, base, epoch) for v in variants]
    by_name = {r.variant: r for r in results}
    dvt = [read_dvt(client, results_dir, c, by_name, tracking_uri, base) for c in cascades]
    experiments = {r.measured.experiment_id for r in results if r.measured is not None}
    names = sorted(client.get_experiment(e).name for e in experiments)
    return Study(results, dvt, tracking_uri, base, experiment=", ".join(names), epoch=epoch)
