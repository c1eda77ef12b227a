"""The one training loop every model goes through, on one process or as a DDP rank under Ray.

:func:`fit` knows nothing about Ray or MLflow: it talks to a :class:`Session` (rank, world
size, the checkpoint to resume from, and where to report each epoch). :class:`LocalSession` runs
it in-process (tests, debugging); :mod:`pipeline.train.runner` supplies the Ray Train session.
What differs per model lives in a task (:mod:`pipeline.train.task`); the loop never looks at a
model's name.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import build_eval_loader, build_train_loader, build_transforms
from pipeline.train.progress import StepProgress, bar
from pipeline.train.task import ClassificationTask, task_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to train one variant; plain data, so it crosses to Ray workers."""

    variant: str
    model: str
    train: TrainConfig
    shards: str
    num_classes: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    run_id: str | None = None
    #: Check each shard's sha256 on its first read in a process (``data.shards.verify_sha256``).
    verify_sha256: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.model_dump(mode="json")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**{**d, "train": TrainConfig.model_validate(d["train"])})


class Session(Protocol):
    """Where the loop runs: rank, world size, device, resume state and the per-epoch report."""

    rank: int
    world_size: int
    device: torch.device

    def checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None: ...


class LocalSession:
    """A single in-process rank; keeps every report in ``history`` and the last state."""

    def __init__(self, resume: dict[str, Any] | None = None, device: str = "cpu") -> None:
        self.rank, self.world_size, self.device = 0, 1, torch.device(device)
        self.history: list[dict[str, float]] = []
        self.progress_log: list[tuple[int, dict[str, float]]] = []
        self.state: dict[str, Any] | None = resume

    def checkpoint(self) -> dict[str, Any] | None:
        return self.state

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.history.append(metrics)
        self.state = state

    def progress(self, metrics: dict[str, float], step: int) -> None:
        self.progress_log.append((step, metrics))


def build_model(spec: RunSpec) -> nn.Module:
    """``timm.create_model`` for the spec, with the project's models registered."""
    import timm

    import pipeline.models  # noqa: F401 - registers the study's models into timm

    kwargs = {"drop_path_rate": spec.train.drop_path_rate, **spec.model_kwargs}
    try:
        return timm.create_model(
            spec.model, num_classes=spec.num_classes, img_size=spec.train.img_size, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"variant {spec.variant}: unknown model {spec.model!r}; "
                "see timm.list_models() after `import pipeline.models`"
            ) from None
        raise


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, task: ClassificationTask, device: torch.device, autocast: dict[str, Any]
) -> dict[str, float]:
    """Top-1/top-5 (%) and loss over the whole split, summed over ranks.

    Multi-exit models also get ``val_top1_exit<k>`` for every exit k (1-based); the plain
    ``val_*`` metrics are the last exit's.
    """
    model.eval()
    sums: list[float] | None = None
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    for images, labels in bar(loader, desc="evaluate", show=rank0):  # rank 0's share of the split
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(**autocast):
            exits = [x.float() for x in task.exits(model(images))]
        logits = exits[-1]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels[:, None]
        batch = [
            hits[:, 0].sum().item(),
            hits.any(dim=-1).sum().item(),
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
            labels.numel(),
            *((x.argmax(-1) == labels).sum().item() for x in exits),
        ]
        sums = batch if sums is None else [a + b for a, b in zip(sums, batch, strict=True)]
    if sums is None:  # this rank had no validation shard; still join the all-reduce
        n_exits = getattr(model, "num_exits", 1)
        sums = [0.0] * (4 + n_exits)
    correct1, correct5, loss_sum, n, *per_exit = _all_reduce(sums, device)
    n = max(n, 1.0)
    metrics = {"val_top1": 100 * correct1 / n, "val_top5": 100 * correct5 / n, "val_loss": loss_sum / n}
    if len(per_exit) > 1:
        metrics.update({f"val_top1_exit{k + 1}": 100 * c / n for k, c in enumerate(per_exit)})
    return metrics


def _seed_for(cfg: TrainConfig, epoch: int, step: int, rank: int) -> int:
    # Each step's RNG is a pure function of (seed, epoch, step, rank): a run resumed at any
    # checkpoint draws the same augmentation as an uninterrupted one without storing every rank's
    # RNG state (bit-exact with loader_workers=0; worker processes seed themselves per epoch).
    return hash((cfg.seed, epoch, step, rank)) % 2**31


def fit(spec: RunSpec, session: Session) -> dict[str, float]:
    """Train ``spec`` to its last epoch, resuming from the session's checkpoint if it has one.

    Each epoch ends with a report carrying the metrics and (rank 0) the state to checkpoint;
    with ``checkpoint_every_steps`` there are also mid-epoch reports whose metrics hold no
    ``val_top1``. The per-worker share of the global batch is split into micro-batches when it
    exceeds ``max_batch_per_worker`` (gradient accumulation, no DDP sync until the last one).

    Every epoch evaluates the raw weights (``val_*``) and, with ``ema_decay``, the EMA weights
    (``ema_val_*``). The reported weights (the EMA's when on, as the authors' timm script evaluates
    them) are tracked for their best epoch: ``best_val_top1``, ``best_val_top5`` (same epoch) and
    ``best_epoch`` in every epoch's metrics, the weights themselves in the state's ``best``. The
    learning rate follows ``lr_schedule_unit``: set once per epoch, or after every optimizer step.

    Returns:
        The last epoch's metrics.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    cfg, device, world = spec.train, session.device, session.world_size
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    model = build_model(spec).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = task_for(model, spec.num_classes, cfg.augment)
    train_tf, eval_tf = build_transforms(cfg.img_size, cfg.augment)
    accum = cfg.accumulation
    batch = cfg.batch_size // world
    train_loader, steps = build_train_loader(
        spec.shards,
        rank=session.rank,
        world_size=world,
        batch_per_rank=batch,
        transform=train_tf,
        seed=cfg.seed,
        loader_workers=cfg.loader_workers,
        accumulation=accum,
        verify_sha256=spec.verify_sha256,
    )
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)  # the same cap on every rank: DDP stays in step
    eval_loader, _ = build_eval_loader(
        spec.shards,
        rank=session.rank,
        world_size=world,
        batch_size=batch // accum,
        transform=eval_tf,
        loader_workers=cfg.loader_workers,
        verify_sha256=spec.verify_sha256,
    )
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = cfg.lr_schedule_unit == "epoch"  # as the authors' timm 0.3.4: one rate per epoch
    unit = 1 if per_epoch else steps
    schedule = CosineLRScheduler(
        optimizer,
        t_initial=(cfg.epochs - cfg.cooldown_epochs) * unit,
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_epochs if per_epoch else round(cfg.warmup_epochs * steps),
        warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=per_epoch,
    )  # after t_initial the rate stays at lr_min: the cool-down epochs
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    # The reported weights (the EMA's when on, as the authors evaluate them) and their best epoch.
    scored = "ema_val_top1" if ema is not None else "val_top1"
    best: dict[str, Any] = {"epoch": -1, "val_top1": -1.0, "val_top5": -1.0, "model": None}

    epoch, step = 0, 0  # the next optimizer step to run
    if (state := session.checkpoint()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        epoch, step = int(state["epoch"]), int(state["step"])
        best = dict(state.get("best") or best)
        if best["model"] is not None:  # rank 0 keeps the best weights on the CPU, as it took them
            best["model"] = {k: v.cpu() for k, v in best["model"].items()} if session.rank == 0 else None
        if step >= steps:
            epoch, step = epoch + 1, 0
        log.info("%s: resuming at epoch %d step %d", spec.variant, epoch, step)
    net: nn.Module = model
    if dist.is_available() and dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    autocast = {
        "device_type": device.type,
        "dtype": torch.bfloat16,
        "enabled": device.type == "cuda" and cfg.amp == "bf16",
    }
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def snapshot(epoch: int, step: int, metrics: dict[str, float]) -> dict[str, Any] | None:
        if session.rank != 0:
            return None
        return {
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "best": best,
            "epoch": epoch,
            "step": step,
            "metrics": metrics,
            "config": spec.to_dict(),
            "mlflow_run_id": spec.run_id,
        }

    metrics: dict[str, float] = {}
    progress = StepProgress(
        spec.variant,
        session,
        rank=session.rank,
        steps=steps,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        every=cfg.log_every_steps,
    )
    while epoch < cfg.epochs:
        train_loader.dataset.set_epoch(epoch, skip_batches=step * accum)
        if per_epoch:
            schedule.step(epoch)  # also right after a resume, mid-epoch or not
        net.train()
        first, loss_sum, tic = step, 0.0, time.perf_counter()
        progress.start_epoch(epoch, first)
        micro = iter(train_loader)
        for step in range(first, steps):
            seed_everything(_seed_for(cfg, epoch, step, session.rank))
            step_loss = 0.0
            for k in range(accum):
                images, labels = next(micro)
                images, target = task.targets(
                    images.to(device, non_blocking=True, memory_format=fmt),
                    labels.to(device, non_blocking=True),
                )
                sync = k == accum - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
                with contextlib.nullcontext() if sync else net.no_sync(), torch.autocast(**autocast):
                    loss = task.loss(net(images), target) / accum
                loss.backward()
                step_loss += loss.item()
            loss_sum += step_loss
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=epoch * steps + step + 1)
            if not per_epoch:
                schedule.step_update(epoch * steps + step + 1)
            done = step + 1
            progress.step(done, loss_sum, optimizer.param_groups[0]["lr"])
            if cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0 and done < steps:
                # This rank's loss of the step just taken (unreduced), e.g. to compare resumed runs.
                partial = {"epoch": epoch, "step": done, "step_loss": step_loss}
                session.report(partial, snapshot(epoch, done, partial))
        elapsed = time.perf_counter() - tic
        ran = max(steps - first, 1)
        (train_loss,) = _all_reduce([loss_sum / ran], device)
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss / world,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": ran * cfg.batch_size / elapsed,
            **evaluate(model, eval_loader, task, device, autocast),
        }
        if ema is not None:
            ema_metrics = evaluate(ema.module, eval_loader, task, device, autocast)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if metrics[scored] > best["val_top1"]:  # the first epoch of the highest top-1 wins a tie
            weights = (ema.module if ema is not None else model).state_dict()
            best = {
                "epoch": epoch,
                "val_top1": metrics[scored],
                "val_top5": metrics[scored.replace("top1", "top5")],
                "model": {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
                if session.rank == 0
                else None,
            }
        metrics.update(
            best_val_top1=best["val_top1"], best_val_top5=best["val_top5"], best_epoch=best["epoch"]
        )
        log.info(
            "%s epoch %d/%d %s",
            spec.variant,
            epoch + 1,
            cfg.epochs,
            " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"),
        )
        session.report(metrics, snapshot(epoch, steps, metrics))
        epoch, step = epoch + 1, 0
    return metrics
