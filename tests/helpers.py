"""What several test files share: worktree copies, free ports, the model check, and a report study.

Test files import from here (``from helpers import ...``; pytest puts ``tests/`` on the path), never
from one another; ``conftest.py`` holds only fixtures.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


ROOT = Path(__file__).resolve().parents[1]


# -- the repository and the network ------------------------------------------------------------------


def copy_worktree(root: Path, dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files, as a fresh clone would have them."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = root / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago (all bound at once, then closed)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


# -- models --------------------------------------------------------------------------------------------


def assert_trains(
    model: torch.nn.Module, *, batch: int = 2, img_size: int = 64, num_classes: int = 10, exits: int = 1
) -> None:
    """One training step's worth of checks on a model in train mode.

    The output is ``(batch, num_classes)`` logits (a list of ``exits`` of them for a multi-exit model,
    whose losses are summed as DVT trains), every logit is finite, every trainable parameter gets a
    finite gradient and no frozen one gets any.
    """
    import torch
    import torch.nn.functional as F

    images = torch.randn(batch, 3, img_size, img_size)
    outputs = model(images)
    if exits > 1:
        assert isinstance(outputs, list) and len(outputs) == exits, type(outputs)
    else:
        outputs = [outputs]
    target = torch.arange(batch) % num_classes
    for logits in outputs:
        assert logits.shape == (batch, num_classes)
        assert torch.isfinite(logits).all()
    sum(F.cross_entropy(logits, target) for logits in outputs).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"


def tiny_spec(shards: Path, **train: Any) -> Any:
    """A :class:`~pipeline.train.loop.RunSpec` of a two-layer ViT at 32 px on ``shards`` (4 classes):
    one epoch in a few seconds on a CPU. ``train`` overrides :class:`~pipeline.config.TrainConfig`'s
    fields (``epochs``, ``ema_decay``, ...)."""
    from pipeline.config import AugmentConfig, TrainConfig
    from pipeline.train.loop import RunSpec

    base = {
        "img_size": 32,
        "epochs": 3,
        "warmup_epochs": 0.5,
        "cooldown_epochs": 0,
        "batch_size": 8,
        "lr": 2e-3,
        "drop_path_rate": 0.0,
        "num_workers": 1,
        "augment": AugmentConfig(scale_min=0.5),
    }
    return RunSpec(
        variant="tiny",
        model="vit_tiny_patch16_224",
        train=TrainConfig(**{**base, **train}),
        shards=str(shards),
        num_classes=4,
        model_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
    )


# -- a study for the report: real MLflow runs and results files ------------------------------------------

EXPERIMENT = "t2t-vit-study"
UI = "http://mlflow.example:5000"

#: The study's variants: (name, model, model_kwargs, img_size, params_m, macs_g, final top-1).
VARIANTS = [
    ("t2t_vit_7", "t2t_vit_7", {}, 64, 4.258, 0.0985, 61.0),
    (
        "vit_7",
        "vit_s16_paper",
        {"depth": 7, "embed_dim": 256, "num_heads": 4, "mlp_ratio": 2.0},
        64,
        3.9,
        0.062,
        52.0,
    ),
    ("t2t_vit_14", "t2t_vit_14", {}, 224, 21.5, 4.78, 70.0),
    ("dvt_t2t_vit_7", "dvt_t2t_vit_12", {"depth": 7}, 64, 13.4, 0.18, 64.0),
]
DVT_VARIANT = "dvt_t2t_vit_7"
STAGE_GMACS = [0.030, 0.057, 0.093]
EPOCHS = 4


@dataclass
class StudyFiles:
    """A study on disk: the SQLite store, the results folder, and the ids of what is in it."""

    base: Path
    runs: dict[str, str]
    stale_run: str
    tune_run: str
    trials: dict[str, str]

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.base / 'mlflow.db'}"

    @property
    def results(self) -> Path:
        return self.base / "results"

    def copy(self, dest: Path) -> StudyFiles:
        shutil.copytree(self.base, dest)
        return StudyFiles(dest, dict(self.runs), self.stale_run, self.tune_run, dict(self.trials))


def _log_training(
    client: Any,
    exp: str,
    variant: str,
    model: str,
    kwargs: dict,
    img: int,
    params_m: float,
    macs_g: float,
    top1: float,
    phash: str,
    exits: int = 1,
) -> str:
    """A finished training run as the train stage logs it: params, tags, cost, one row per epoch."""
    from mlflow.entities import Metric, Param

    from pipeline.tracking import flatten

    tags = {
        "variant": variant,
        "model": model,
        "params_hash": phash,
        "git_commit": "0123456789abcdef" * 2,
        "dvc_stage": f"train@{variant}",
    }
    run_id = client.create_run(exp, run_name=variant, tags=tags).info.run_id
    params = flatten(
        {
            "variant": variant,
            "model": model,
            "model_kwargs": kwargs,
            "train": {"img_size": img, "epochs": EPOCHS},
        }
    )
    now = int(time.time() * 1000)
    metrics = [Metric("params_m", params_m, now, 0), Metric("macs_g", macs_g, now, 0)]
    for epoch in range(EPOCHS):
        acc = top1 * (epoch + 1) / EPOCHS
        values = {
            "train_loss": 1.5 - 0.2 * epoch,
            "lr": 1e-3,
            "images_per_s": 100.0 + epoch,
            "val_top1": acc,
            "val_top5": min(100.0, acc + 30),
            "val_loss": 1.4 - 0.2 * epoch,
        }
        if exits > 1:
            values.update({f"val_top1_exit{k}": acc - 4 * (exits - k) for k in range(1, exits + 1)})
        metrics += [Metric(k, v, now + epoch, epoch) for k, v in values.items()]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=metrics)
    client.set_terminated(run_id)
    return run_id


def _write_dvt(results: Path, client: Any, exp: str, trained_run: str) -> tuple[str, dict[str, str]]:
    """results/dvt/<cascade>/ exactly as the tune_dvt stage writes it, from a synthetic cascade's softmax
    outputs (calibrated on one set of images, reported on another)."""
    import numpy as np

    from pipeline.dvt.points import best_within, score_point, sweep
    from pipeline.dvt.records import ReuseAblation, ReuseTrial, TuneRecord
    from pipeline.dvt.search import REUSE_COMBINATIONS
    from pipeline.dvt.study import write_outputs

    def outputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, n)
        logits = rng.normal(size=(3, n, 4)) + np.arange(1, 4)[:, None, None] * np.eye(4)[labels]
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), labels

    calib, reported = outputs(120, 0), outputs(120, 1)
    stage_macs = [g * 1e9 for g in STAGE_GMACS]
    curve = sweep(calib, reported, stage_macs)
    parent = client.create_run(
        exp,
        run_name=f"tune_dvt-{DVT_VARIANT}",
        tags={"dvc_stage": f"tune_dvt@{DVT_VARIANT}", "variant": DVT_VARIANT, "trained_run_id": trained_run},
    )
    client.set_terminated(parent.info.run_id)
    # The trials as tune_dvt logs them: child runs named by combination (and threshold trials beside).
    trials, reuse = {}, []
    for i, combo in enumerate(REUSE_COMBINATIONS):
        tags = {"mlflow.parentRunId": parent.info.run_id, "dvt_trial": "reuse"}
        trials[combo.name] = client.create_run(exp, run_name=combo.name, tags=tags).info.run_id
        top1 = 40.0 - 2 * i
        exits = [top1 - 3 + k for k in (1, 2, 3)]
        reuse.append(ReuseTrial(combo.feature_reuse, combo.relation_reuse, top1, exits, trials[combo.name]))
    tags = {"mlflow.parentRunId": parent.info.run_id, "dvt_trial": "threshold"}
    trials["eta=(0.700,0.600)"] = client.create_run(exp, run_name="eta=(0.700,0.600)", tags=tags).info.run_id
    record = TuneRecord(
        variant=DVT_VARIANT,
        model="dvt_t2t_vit_12",
        run_id=parent.info.run_id,
        trained_run_id=trained_run,
        img_size=64,
        calibration="train",
        calibration_images=120,
        reported_images=120,
        budget_gmacs=0.06,
        stage_gmacs=STAGE_GMACS,
        exit_top1=[100.0 * float(np.mean(p.argmax(-1) == reported[1])) for p in reported[0]],
        curve=curve,
        msdnet=best_within(curve, 0.06),
        optuna=score_point([0.7, 0.6, -math.inf], calib, reported, stage_macs),
        reuse=ReuseAblation(epochs=1, steps_per_epoch=20, workers=1, trials=reuse),
    )
    write_outputs(record, results / "dvt" / DVT_VARIANT)
    return parent.info.run_id, trials


def make_study(base: Path) -> StudyFiles:
    """The current study plus noise: an older run of t2t_vit_7 (other params hash) and another experiment."""
    from mlflow.tracking import MlflowClient

    base.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{base / 'mlflow.db'}")
    exp = client.create_experiment(EXPERIMENT, artifact_location=(base / "mlartifacts").as_uri())
    other = client.create_experiment("someone-else", artifact_location=(base / "mlartifacts").as_uri())
    stale = _log_training(client, exp, "t2t_vit_7", "t2t_vit_7", {}, 64, 4.258, 0.0985, 12.5, phash="old0")
    _log_training(client, other, "vit_7", "vit_s16_paper", {}, 64, 3.9, 0.062, 13.5, phash="x")
    runs = {}
    for name, model, kwargs, img, params_m, macs_g, top1 in VARIANTS:
        exits = 3 if name == DVT_VARIANT else 1
        runs[name] = _log_training(
            client, exp, name, model, kwargs, img, params_m, macs_g, top1, "new1", exits
        )
        record = {
            "variant": name,
            "model": model,
            "run_id": runs[name],
            "experiment": EXPERIMENT,
            "val_top1": -1.0,
            "params_m": -1.0,
        }  # not what the report shows: it reads MLflow
        (base / "results").mkdir(exist_ok=True)
        (base / "results" / f"{name}.json").write_text(json.dumps(record))
    tune, trials = _write_dvt(base / "results", client, exp, runs[DVT_VARIANT])
    return StudyFiles(base, runs, stale, tune, trials)


class Page(HTMLParser):
    """Tables, rows (with their data-* attributes), links and images of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str] = []
        self.rows: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self._row: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "table":
            self.tables.append(a.get("data-table", ""))
        elif tag == "tr":
            self.rows.append((self.tables[-1], a))
        elif tag == "a":
            self.links.append(a.get("href", ""))
            if self.rows:
                self.rows[-1][1].setdefault("_links", "")
                self.rows[-1][1]["_links"] += a.get("href", "") + " "
        elif tag == "img":
            self.images.append(a.get("src", ""))


def parse_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


# -- the fault tests' miniature training (test_fault_tolerance, test_multinode) ------------------------

#: Epochs of the fault tests' training.
FAULT_EPOCHS = 4


def make_fault_study(tmp_path: Path, root: Path) -> Path:
    """A miniature repo for the fault tests: params, shards, and an empty dvc.yaml marking the root."""
    import yaml

    from pipeline.demo_data import generate_demo
    from pipeline.shards import write_shards

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    generate_demo(
        tmp_path / "data/demo",
        num_classes=4,
        train_per_class=30,
        val_per_class=10,
        image_size=40,
        seed=0,
        show_progress=False,
    )
    write_shards(
        tmp_path / "data/demo", tmp_path / "data/shards", max_samples_per_shard=32, show_progress=False
    )
    raw = yaml.safe_load((root / "profiles/mini.yaml").read_text())
    raw["train"].update(
        img_size=32, epochs=FAULT_EPOCHS, batch_size=16, checkpoint_every_steps=2, max_failures=2
    )
    raw["variants"] = {
        "tiny": {
            "model": "vit_tiny_patch16_224",
            "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        }
    }
    # The tune stage is not run here; its section must still name a variant.
    raw["dvt"].update(variants=["tiny"], backbones={}, reuse_ablation=[], budget_gmacs=1.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def wait_for_checkpoint(
    repo: Path, proc: subprocess.Popen, timeout: float = 240, store: str | None = None
) -> None:
    """Until the first epoch is checkpointed and logged (rank 0 logs only after Ray persisted it).
    ``store``: the tracking URI to read, when not the repo's ``mlflow.db``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before its first checkpoint:\n{proc.stdout.read()[-4000:]}")
        # Read MLflow only once Ray wrote a checkpoint: the driver has long created the database.
        checkpointed = any((repo / "runs" / "ray").glob("*/checkpoint_*"))
        if checkpointed and any(steps for _, steps in mlflow_runs(repo, store)):
            return
        time.sleep(1)
    raise AssertionError("no checkpoint appeared")


def mlflow_runs(repo: Path, store: str | None = None) -> list:
    """Every run of the store (the repo's ``mlflow.db`` by default) with the steps of its val_top1."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store or f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    return [(r, sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_top1"))) for r in runs]


def ray_checkpoints(repo: Path) -> set[tuple[int, int]]:
    """(epoch, step) of every checkpoint Ray persisted for the run (it keeps the last two)."""
    import torch

    found = set()
    for folder in (repo / "runs" / "ray").glob("*/checkpoint_*"):
        if (folder / "state.pt").is_file():
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            found.add((int(state["epoch"]), int(state["step"])))
    return found


def resumed_at(repo: Path, run, store: str | None = None) -> list[tuple[int, int]]:
    """Where each resumed attempt of the run started, as its rank 0 logged it to MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store or f"sqlite:///{repo / 'mlflow.db'}")
    epochs = sorted(client.get_metric_history(run.info.run_id, "resumed_epoch"), key=lambda m: m.step)
    steps = sorted(client.get_metric_history(run.info.run_id, "resumed_step"), key=lambda m: m.step)
    return [(int(e.value), int(s.value)) for e, s in zip(epochs, steps, strict=True)]


def stop_process_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the process a test started and every descendant it has, by pid; SIGKILL stragglers."""
    import contextlib
    import signal

    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
