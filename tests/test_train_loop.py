"""The model-agnostic loop, in-process (no Ray): it learns, it is deterministic, it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.train.loop import LocalSession, RunSpec, fit
from pipeline.train.task import ClassificationTask, MultiExitTask, task_for

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _spec(shards: Path, **train) -> RunSpec:
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
    cfg = TrainConfig(**{**base, **train})
    return RunSpec(
        variant="tiny",
        model="vit_tiny_patch16_224",
        train=cfg,
        shards=str(shards),
        num_classes=4,
        model_kwargs=TINY,
    )


def test_fit_reports_every_epoch_and_learns(tiny_shards: Path) -> None:
    session = LocalSession()
    final = fit(_spec(tiny_shards, epochs=6), session)
    assert [m["epoch"] for m in session.history] == list(range(6))
    assert session.history[-1]["train_loss"] < session.history[0]["train_loss"]
    assert 0 <= final["val_top1"] <= final["val_top5"] <= 100
    assert set(session.state) == {
        "model",
        "ema",
        "optimizer",
        "epoch",
        "step",
        "metrics",
        "config",
        "mlflow_run_id",
    }


def test_max_steps_per_epoch_caps_every_epoch(tiny_shards: Path) -> None:
    full, capped = LocalSession(), LocalSession()
    fit(_spec(tiny_shards, epochs=2), full)
    fit(_spec(tiny_shards, epochs=2, max_steps_per_epoch=2), capped)
    assert full.state["step"] > 2
    assert capped.state["step"] == 2
    assert [m["epoch"] for m in capped.history] == [0, 1]
    assert capped.history[-1]["train_loss"] != full.history[-1]["train_loss"]


def test_same_seed_same_losses(tiny_shards: Path) -> None:
    runs = [LocalSession(), LocalSession()]
    for s in runs:
        fit(_spec(tiny_shards, epochs=2), s)
    assert [m["train_loss"] for m in runs[0].history] == [m["train_loss"] for m in runs[1].history]


def test_resume_continues_from_the_checkpoint(tiny_shards: Path) -> None:
    full = LocalSession()
    fit(_spec(tiny_shards, epochs=3), full)
    first = LocalSession()
    fit(_spec(tiny_shards, epochs=3), first)
    state = first.state
    state["epoch"] = 1  # pretend the run died after epoch 2
    resumed = LocalSession(resume=state)
    fit(_spec(tiny_shards, epochs=3), resumed)
    assert [m["epoch"] for m in resumed.history] == [2]


class _DieAt(LocalSession):
    """Stops the run (as a killed worker would) right after the report of a given step."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__()
        self.at = (epoch, step)

    def report(self, metrics, state):
        super().report(metrics, state)
        if (metrics["epoch"], metrics.get("step")) == self.at:
            raise KeyboardInterrupt


def test_mid_epoch_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_shards: Path) -> None:
    # 48 train images / batch 8 = 6 steps per epoch; checkpoint every 2 steps.
    spec = _spec(tiny_shards, epochs=2, checkpoint_every_steps=2)
    whole = LocalSession()
    fit(spec, whole)
    dying = _DieAt(epoch=1, step=4)
    with pytest.raises(KeyboardInterrupt):
        fit(spec, dying)
    resumed = LocalSession(resume=dying.state)
    fit(spec, resumed)
    assert [m["epoch"] for m in resumed.history] == [1]
    # The resumed epoch ran only steps 4-5: its mean loss covers those steps only, but the
    # weights it ends with (hence validation) match the uninterrupted run.
    assert resumed.history[-1]["val_loss"] == pytest.approx(whole.history[-1]["val_loss"], rel=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tiny_shards: Path) -> None:
    full, accum = LocalSession(), LocalSession()
    fit(_spec(tiny_shards, epochs=1), full)
    fit(_spec(tiny_shards, epochs=1, max_batch_per_worker=4), accum)
    assert _spec(tiny_shards, max_batch_per_worker=4).train.accumulation == 2
    assert accum.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-4)


def test_ema_weights_are_the_ones_evaluated(tiny_shards: Path) -> None:
    session = LocalSession()
    fit(_spec(tiny_shards, epochs=1, ema_decay=0.5), session)
    ema, raw = session.state["ema"], session.state["model"]
    assert ema is not None and any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_checkpoint_state_loads_with_weights_only(tiny_shards: Path, tmp_path: Path) -> None:
    session = LocalSession()
    fit(_spec(tiny_shards, epochs=1), session)
    torch.save(session.state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["config"]["model"] == "vit_tiny_patch16_224"


def test_mixup_targets_are_soft_and_loss_finite() -> None:
    task = ClassificationTask(4, AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0))
    images, target = task.targets(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert target.shape == (4, 4) and torch.allclose(target.sum(-1), torch.ones(4))
    assert torch.isfinite(task.loss(torch.randn(4, 4), target))


def test_multi_exit_models_get_a_summed_loss() -> None:
    class TwoExits(nn.Module):
        num_exits = 2

    task = task_for(TwoExits(), 3, AugmentConfig(label_smoothing=0.0))
    assert isinstance(task, MultiExitTask)
    a, b, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    expected = nn.functional.cross_entropy(a, y) + nn.functional.cross_entropy(b, y)
    assert torch.allclose(task.loss([a, b], y), expected)
    assert task.logits([a, b]) is b


@pytest.mark.parametrize("bad", ["no_such_model_xyz"])
def test_unknown_model_is_named(tiny_shards: Path, bad: str) -> None:
    spec = _spec(tiny_shards)
    spec = RunSpec(**{**spec.__dict__, "model": bad})
    with pytest.raises(ValueError, match=bad):
        fit(spec, LocalSession())
