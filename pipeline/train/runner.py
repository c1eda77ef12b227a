"""The driver of one training: MLflow run, Ray Train ``TorchTrainer`` over N workers, result file.

The driver (the DVC stage's process) checks the tracking store, opens the MLflow run and logs the
resolved params, tags, parameter count and MACs before any worker starts; workers rebuild the
:class:`~pipeline.train.loop.RunSpec` and call the same :func:`~pipeline.train.loop.fit` the
single-process tests call, rank 0 logging per-epoch metrics into that run. A local Ray instance
is started unless ``RAY_ADDRESS`` names a cluster.

Resuming. The Ray run is named ``<variant>-<key>``, the key covering the variant's resolved
recipe, its model, the data manifest, the tracking store and experiment, and the training code
(:mod:`pipeline.train.resume`, which also decides when checkpoints may be deleted and holds the
lease that keeps a second trainer of the same key out). Ray resumes a run of that name from its
last checkpoint, both after a worker dies (``FailureConfig(max_failures)`` restarts the worker
group in place) and when an interrupted ``dvc repro`` is run again; the driver then reopens the
same MLflow run (its id is in the checkpoint and in the run's tags), and rank 0 logs only epochs
not logged yet, so one training is one MLflow run with every epoch exactly once. A params change
gives a new key, hence a fresh run; a finished run of the same key is never resumed (``dvc repro
-f`` retrains, deleting that run's checkpoints only once MLflow confirms it FINISHED).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import StudyConfig, params_hash
from pipeline.paths import resolve_state
from pipeline.shards import MANIFEST, Store, read_manifest
from pipeline.shardsets import shards_for_stage
from pipeline.storage import atomic_write, is_uri
from pipeline.tracking import check_tracking, flatten, git_state, sha256_of, tracked_run, tracking_uri
from pipeline.tracking import experiment_id as tracking_experiment
from pipeline.train.loop import RunSpec, build_model
from pipeline.train.ray_driver import build_trainer, ray_running
from pipeline.train.registry import log_model
from pipeline.train.results import RUN_FIGURES, results_record
from pipeline.train.resume import code_hash, resumable_run, run_key, training_lease

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
EPOCH_METRIC = "val_top1"  # present only in end-of-epoch reports


class TrainingFailed(RuntimeError):
    """The Ray training run ended in an error; the MLflow run is marked FAILED."""


def _logged_epochs(client: Any, run_id: str) -> int:
    """How many epochs the MLflow run already holds (steps 0..n-1 of the epoch metric)."""
    history = client.get_metric_history(run_id, EPOCH_METRIC)
    return 1 + max((m.step for m in history), default=-1)


class RaySession:
    """A Ray Train worker as seen by :func:`fit`: rank 0 checkpoints and logs to MLflow."""

    def __init__(self, spec: RunSpec) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.spec = spec
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        use_gpu = spec.train.use_gpu and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(spec.train.torch_threads)
        self.client = self.monitor = None
        self.logged = 0
        if self.rank == 0 and spec.run_id:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(spec.tracking_uri)
            self.logged = _logged_epochs(self.client, spec.run_id)
            # CPU, memory, disk, network; GPU utilisation and memory where pynvml finds a GPU.
            self.monitor = SystemMetricsMonitor(
                spec.run_id, sampling_interval=5, resume_logging=True, tracking_uri=spec.tracking_uri
            )
            self.monitor.start()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()

    def checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=self.device, weights_only=True)
        if self.spec.run_id and state.get("mlflow_run_id") not in (None, self.spec.run_id):
            raise TrainingFailed(
                f"checkpoint {ckpt.path} belongs to MLflow run {state['mlflow_run_id']}, "
                f"not {self.spec.run_id}"
            )
        # An epoch checkpointed but not logged (the worker died in between) is logged now.
        if self.rank == 0 and EPOCH_METRIC in state.get("metrics", {}):
            self._log(state["metrics"])
        if self.rank == 0 and self.client is not None:
            # Where this attempt starts: the checkpoint's (epoch, step). The fault tests compare it
            # with the checkpoint on disk; a restart from scratch logs nothing here.
            resumes = len(self.client.get_metric_history(self.spec.run_id, "resumed_epoch"))
            now = int(time.time() * 1000)
            from mlflow.entities import Metric

            self.client.log_batch(
                self.spec.run_id,
                metrics=[
                    Metric("resumed_epoch", float(state["epoch"]), now, resumes),
                    Metric("resumed_step", float(state["step"]), now, resumes),
                ],
            )
        return state

    def _log(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        epoch = int(metrics["epoch"])
        if self.client is None or epoch < self.logged:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.spec.run_id, metrics=batch)
        self.logged = epoch + 1

    def progress(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0's mid-epoch progress (:class:`~pipeline.train.progress.StepProgress`), logged at
        the global optimizer step (the per-epoch metrics use the epoch as their step)."""
        from mlflow.entities import Metric

        if self.client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.spec.run_id, metrics=batch)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        # ray.train.report is a barrier: every rank calls it at the same points; only rank 0
        # passes a checkpoint. Metrics are logged after the checkpoint is persisted, so a crash
        # in between leaves the epoch to be logged on resume rather than logged twice.
        if self.rank != 0 or state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if EPOCH_METRIC in metrics:
            self._log(metrics)


def _watch_interrupts() -> threading.Event:
    """An event set on SIGINT/SIGTERM, chained before the existing handlers (Ray may translate the
    KeyboardInterrupt into its own error, so the exception type alone cannot tell)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return event
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            event.set()
            if callable(previous):
                previous(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(sig, handler)
    return event


def train_variant(cfg: StudyConfig, variant: str, *, root: Path, results_dir: Path) -> dict[str, Any]:
    """Train one variant once per seed of ``train.seeds`` and write ``results_dir/<variant>.json``.

    Each seed is its own training: its own MLflow run (tag ``seed``), Ray run and checkpoints. The
    results file lists every run and gives each figure as the mean over the seeds, with its sample
    standard deviation and n (:mod:`pipeline.stats`).

    Returns:
        The result record (also written to the JSON file).

    Raises:
        TrackingUnavailable: the MLflow store cannot be reached (before anything starts).
        TrainingFailed: a training failed; the seeds before it stay finished in MLflow, and a
            re-run resumes the failed one from its last checkpoint.
    """
    seeds = cfg.train_for(variant).seeds
    with ray_running():  # one Ray instance for every seed
        runs = [_train_seed(cfg, variant, seed, root=root) for seed in seeds]
    record = results_record(cfg, variant, runs)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(results_dir / f"{variant}.json", json.dumps(record, indent=2) + "\n")
    top1 = (record["summary"]["top1"] or {}).get("text", "n/a")
    out = results_dir / f"{variant}.json"
    log.info("%s: val top-1 %s over %d seed(s) -> %s", variant, top1, len(runs), out)
    return record


def _train_seed(cfg: StudyConfig, variant: str, seed: int, *, root: Path) -> dict[str, Any]:
    """Train ``variant`` with ``seed`` on Ray, tracked in its own MLflow run.

    Returns:
        The run's record: seed, run id, model size and cost, and its
        :data:`~pipeline.train.results.RUN_FIGURES`.

    Raises:
        TrackingUnavailable: the MLflow store cannot be reached (before anything starts).
        TrainingFailed: the workers failed more than ``max_failures`` times; the MLflow run is
            marked FAILED and a re-run resumes from the last checkpoint.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipeline.models.cost import count_macs, count_params

    vcfg, tcfg = cfg.variants[variant], cfg.train_for(variant).for_seed(seed)
    single = len(cfg.train_for(variant).seeds) == 1
    # An absolute folder, or a URI unchanged (in a dvc exp copy, where the tars are: shards_for_stage).
    shards = shards_for_stage(cfg.data.shards.output, root)
    manifest = read_manifest(shards)
    uri = tracking_uri(root)
    check_tracking(uri)
    spec = RunSpec(
        variant=variant,
        model=vcfg.model,
        train=tcfg,
        shards=shards,
        num_classes=len(manifest["classes"]),
        model_kwargs=dict(vcfg.model_kwargs),
        tracking_uri=uri,
        verify_sha256=cfg.data.shards.verify_sha256,
    )
    model = build_model(spec)  # fails here, in seconds, on a bad model name or kwargs
    n_all, n_trainable = count_params(model)
    macs = count_macs(model, tcfg.img_size)
    del model

    client = MlflowClient(uri)
    experiment_id = tracking_experiment(client, cfg.tracking.experiment, uri, root)
    manifest_sha = sha256_of(Store(shards).url_of(MANIFEST))
    phash = params_hash(tcfg, vcfg, manifest_sha)
    key = run_key(phash, tracking_uri=uri, experiment=cfg.tracking.experiment, code=code_hash())
    # In the user's checkout, also under dvc exp run --temp/--queue (DVC's copy is thrown away).
    storage = resolve_state(tcfg.storage_path, root) if not is_uri(tcfg.storage_path) else None
    name = f"{variant}-{key}"
    # Held from here to the end of the fit: a second trainer of this key fails now, naming this one.
    lease = training_lease(str(storage) if storage else tcfg.storage_path, name).acquire()
    run_id = resumable_run(client, experiment_id, key, str(storage), name) if storage else None
    if run_id:
        log.info("resuming MLflow run %s from the last checkpoint in %s", run_id, storage / name)
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {
            **git_state(root),
            "variant": variant,
            "model": vcfg.model,
            "dvc_stage": f"train@{variant}",
            "params_hash": phash,
            "run_key": key,
            "data_manifest_sha256": manifest_sha,
            "seed": str(seed),
        }
        if os.environ.get("RAY_JOB_ID"):
            tags["ray_job_id"] = os.environ["RAY_JOB_ID"]
        run_name = variant if single else f"{variant}-seed{seed}"
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = flatten(
            {
                "variant": variant,
                "model": vcfg.model,
                "model_kwargs": vcfg.model_kwargs,
                "train": tcfg.model_dump(mode="json"),
                "num_classes": spec.num_classes,
            }
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            metrics=[
                Metric("params_m", n_all / 1e6, now, 0),
                Metric("params_trainable_m", n_trainable / 1e6, now, 0),
                Metric("macs_g", macs / 1e9, now, 0),
            ],
        )
    if storage is None:
        # Object-store checkpoints cannot be listed cheaply here: a worker-group restart still
        # resumes in place, but each stage run gets its own Ray run (no resume across dvc repro).
        name = f"{name}-{run_id[:8]}"
    spec = replace(spec, run_id=run_id)
    log.info("MLflow run %s (experiment %s) at %s", run_id, cfg.tracking.experiment, uri)
    log.info(
        "%s: %s, %.2f M params, %.3f G MACs at %d px",
        *(variant, vcfg.model, n_all / 1e6, macs / 1e9, tcfg.img_size),
    )

    interrupted = _watch_interrupts()
    with lease, ray_running(), tracked_run(client, run_id, interrupted=interrupted):
        trainer = build_trainer(
            spec,
            name=name,
            storage_path=str(storage) if storage else tcfg.storage_path,
            max_failures=tcfg.max_failures,
            keep_checkpoints=2,
        )
        try:
            result = trainer.fit()
        except (KeyboardInterrupt, SystemExit) as err:
            # Ctrl-C during fit() reaches Ray's own SIGINT handler, which aborts the workers and
            # calls sys.exit(0): make sure DVC sees a failed stage, and the run reads as killed.
            log.warning("interrupted: re-run the stage to resume %s from its last checkpoint", variant)
            raise SystemExit(130) from err
        except Exception as err:  # Ray raises its own error types for a failed worker group
            raise TrainingFailed(
                f"training {variant} failed after {tcfg.max_failures} restart(s): {err}. "
                "Re-run the stage to resume from the last checkpoint in "
                f"{storage or tcfg.storage_path}/{name}."
            ) from err
        if result.error is not None:
            raise TrainingFailed(f"training {variant} failed: {result.error}")
        metrics = result.metrics or {}
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
            metrics = state.get("metrics", metrics)
            _log_weights(client, run_id, state)
            weights = state["ema"] if state.get("ema") is not None else state["model"]
            log_model(uri, run_id, variant, weights, state["config"])  # MLflow's format, registered

    return {
        "seed": seed,
        "run_id": run_id,
        "model": vcfg.model,
        "params_m": n_all / 1e6,
        "macs_g": macs / 1e9,
        **{k: metrics.get(k) for k in RUN_FIGURES},
    }


def _log_weights(client: Any, run_id: str, state: dict[str, Any]) -> None:
    """The reported weights as run artifacts: ``checkpoint/model.pt`` of the last epoch (the EMA's
    when on) and ``checkpoint/best.pt`` of the best validation epoch."""
    last = state["ema"] if state.get("ema") is not None else state["model"]
    best = state.get("best") or {}
    with tempfile.TemporaryDirectory() as out:
        files = {"model.pt": {"model": last, "epoch": state["epoch"], "config": state["config"]}}
        if best.get("model") is not None:
            files["best.pt"] = {"model": best["model"], "epoch": best["epoch"], "config": state["config"]}
        for name, payload in files.items():
            torch.save(payload, Path(out) / name)
            client.log_artifact(run_id, str(Path(out) / name), artifact_path="checkpoint")
