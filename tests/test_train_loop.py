"""The model-agnostic loop, in-process (no Ray): it learns, it is deterministic, it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_spec
from torch import nn

from pipeline.config import AugmentConfig
from pipeline.train.loop import LocalSession, RunSpec, fit
from pipeline.train.task import ClassificationTask, MultiExitTask, task_for


def test_fit_reports_every_epoch_and_learns(tiny_shards: Path) -> None:
    session = LocalSession()
    final = fit(tiny_spec(tiny_shards, epochs=6), session)
    assert [m["epoch"] for m in session.history] == list(range(6))
    assert session.history[-1]["train_loss"] < session.history[0]["train_loss"]
    assert 0 <= final["val_top1"] <= final["val_top5"] <= 100
    assert set(session.state) == {
        "model",
        "ema",
        "optimizer",
        "best",
        "epoch",
        "step",
        "metrics",
        "config",
        "mlflow_run_id",
    }


def test_max_steps_per_epoch_caps_every_epoch(tiny_shards: Path) -> None:
    full, capped = LocalSession(), LocalSession()
    fit(tiny_spec(tiny_shards, epochs=2), full)
    fit(tiny_spec(tiny_shards, epochs=2, max_steps_per_epoch=2), capped)
    assert full.state["step"] > 2
    assert capped.state["step"] == 2
    assert [m["epoch"] for m in capped.history] == [0, 1]
    assert capped.history[-1]["train_loss"] != full.history[-1]["train_loss"]


def test_same_seed_same_losses(tiny_shards: Path) -> None:
    runs = [LocalSession(), LocalSession()]
    for s in runs:
        fit(tiny_spec(tiny_shards, epochs=2), s)
    assert [m["train_loss"] for m in runs[0].history] == [m["train_loss"] for m in runs[1].history]


def test_resume_continues_from_the_checkpoint(tiny_shards: Path) -> None:
    full = LocalSession()
    fit(tiny_spec(tiny_shards, epochs=3), full)
    first = LocalSession()
    fit(tiny_spec(tiny_shards, epochs=3), first)
    state = first.state
    state["epoch"] = 1  # pretend the run died after epoch 2
    resumed = LocalSession(resume=state)
    fit(tiny_spec(tiny_shards, epochs=3), resumed)
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
    spec = tiny_spec(tiny_shards, epochs=2, checkpoint_every_steps=2)
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
    fit(tiny_spec(tiny_shards, epochs=1), full)
    fit(tiny_spec(tiny_shards, epochs=1, max_batch_per_worker=4), accum)
    assert tiny_spec(tiny_shards, max_batch_per_worker=4).train.accumulation == 2
    assert accum.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-4)


def test_ema_is_evaluated_and_reported_beside_the_raw_weights(tiny_shards: Path) -> None:
    session = LocalSession()
    fit(tiny_spec(tiny_shards, epochs=2, ema_decay=0.5), session)
    ema, raw = session.state["ema"], session.state["model"]
    assert ema is not None and any(not torch.equal(ema[k], raw[k]) for k in raw)
    for m in session.history:
        assert {"val_top1", "val_top5", "val_loss", "ema_val_top1", "ema_val_top5", "ema_val_loss"} <= set(m)
    assert any(m["ema_val_loss"] != m["val_loss"] for m in session.history)
    # "best" follows the EMA weights, the ones the authors report.
    ema_top1 = [m["ema_val_top1"] for m in session.history]
    assert session.history[-1]["best_val_top1"] == max(ema_top1)
    assert session.history[-1]["best_epoch"] == ema_top1.index(max(ema_top1))


def test_without_ema_there_are_no_ema_metrics(tiny_shards: Path) -> None:
    session = LocalSession()
    fit(tiny_spec(tiny_shards, epochs=1), session)
    assert not any(k.startswith("ema_") for k in session.history[-1]) and session.state["ema"] is None


def test_the_best_epoch_and_its_weights_are_kept_across_a_resume(tiny_shards: Path) -> None:
    spec = tiny_spec(tiny_shards, epochs=4, lr=5e-2)  # a rate high enough for top-1 to go down too
    whole = LocalSession()
    fit(spec, whole)
    top1 = [m["val_top1"] for m in whole.history]
    best = whole.state["best"]
    assert best["epoch"] == top1.index(max(top1)) and best["val_top1"] == max(top1)
    assert best["val_top5"] == whole.history[best["epoch"]]["val_top5"]
    assert [m["best_val_top1"] for m in whole.history] == [max(top1[: i + 1]) for i in range(4)]
    assert set(best["model"]) == set(whole.state["model"])
    if best["epoch"] == 3:
        assert all(torch.equal(best["model"][k], whole.state["model"][k]) for k in best["model"])
    dying = _DieAt(epoch=1, step=None)  # dies right after epoch 2's report
    with pytest.raises(KeyboardInterrupt):
        fit(spec, dying)
    resumed = LocalSession(resume=dying.state)
    fit(spec, resumed)
    assert [m["epoch"] for m in resumed.history] == [2, 3]
    for key in ("best_val_top1", "best_val_top5", "best_epoch"):
        assert resumed.history[-1][key] == pytest.approx(whole.history[-1][key], rel=1e-6)
    again = resumed.state["best"]["model"]
    assert all(torch.allclose(again[k], best["model"][k], atol=1e-6) for k in again)


class _RecordRates(LocalSession):
    """Keeps the learning rate the optimizer holds at every report (mid-epoch ones included)."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[tuple[int, int | None, float]] = []

    def report(self, metrics, state):
        super().report(metrics, state)
        rate = state["optimizer"]["param_groups"][0]["lr"]
        self.rates.append((metrics["epoch"], metrics.get("step"), rate))


def test_a_per_epoch_schedule_sets_one_rate_per_epoch_as_timm_0_3_4(tiny_shards: Path) -> None:
    import math

    spec = tiny_spec(tiny_shards, epochs=4, warmup_epochs=1, lr_schedule_unit="epoch",
                     checkpoint_every_steps=2, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6)  # fmt: skip
    session = _RecordRates()
    fit(spec, session)

    def cosine(e: int) -> float:
        return 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 4))

    expected = {0: 1e-6, 1: cosine(1), 2: cosine(2), 3: cosine(3)}
    assert {e for e, _, _ in session.rates} == set(expected)
    for epoch, step, rate in session.rates:  # steps 2 and 4 of every epoch, and its end
        assert rate == pytest.approx(expected[epoch], rel=1e-9), (epoch, step)
    per_step = _RecordRates()
    fit(tiny_spec(tiny_shards, epochs=2, checkpoint_every_steps=2), per_step)
    assert len({rate for e, _, rate in per_step.rates if e == 1}) == 3  # changes within an epoch


def test_a_per_epoch_schedule_resumes_mid_epoch_exactly(tiny_shards: Path) -> None:
    spec = tiny_spec(
        tiny_shards, epochs=2, warmup_epochs=1, lr_schedule_unit="epoch", checkpoint_every_steps=2
    )
    whole = LocalSession()
    fit(spec, whole)
    dying = _DieAt(epoch=1, step=4)
    with pytest.raises(KeyboardInterrupt):
        fit(spec, dying)
    resumed = LocalSession(resume=dying.state)
    fit(spec, resumed)
    assert resumed.history[-1]["lr"] == whole.history[-1]["lr"]
    assert resumed.history[-1]["val_loss"] == pytest.approx(whole.history[-1]["val_loss"], rel=1e-5)


def test_checkpoint_state_loads_with_weights_only(tiny_shards: Path, tmp_path: Path) -> None:
    session = LocalSession()
    fit(tiny_spec(tiny_shards, epochs=1), session)
    torch.save(session.state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["config"]["model"] == "vit_tiny_patch16_224"


def test_the_authors_erasing_fill_and_random_interpolation_reach_timm() -> None:
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from pipeline.data import build_transforms

    aug = AugmentConfig(re_prob=0.25, re_mode="pixel", train_interpolation="random", interpolation="bicubic")
    train, evaluate = build_transforms(32, aug)
    crop = next(t for t in train.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    erase = next(t for t in train.transforms if isinstance(t, RandomErasing))
    assert isinstance(crop.interpolation, (list, tuple)) and len(crop.interpolation) == 2  # bilinear, bicubic
    assert erase.mode == "pixel" and erase.probability == 0.25
    assert "bicubic" in str(evaluate.transforms[0]).lower()  # evaluation keeps one interpolation
    default, _ = build_transforms(32, AugmentConfig(re_prob=0.25))
    assert next(t for t in default.transforms if isinstance(t, RandomErasing)).mode == "const"


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
    spec = tiny_spec(tiny_shards)
    spec = RunSpec(**{**spec.__dict__, "model": bad})
    with pytest.raises(ValueError, match=bad):
        fit(spec, LocalSession())
