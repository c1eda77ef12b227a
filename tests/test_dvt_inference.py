"""DVT inference: batched early exit equals the simulated one, and the threshold rules do what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from pipeline.dvt import (
    CurvePoint,
    all_stage_logits,
    best_under_budget,
    budget_curve,
    calibrate_thresholds,
    collect_stage_probs,
    early_exit,
    evaluate_early_exit,
    evaluate_thresholds,
    exit_proportions,
    exit_stages,
    holdout_split,
    proportion_sweep,
)
from pipeline.dvt.thresholds import softmax

TINY = dict(num_classes=10, img_size=64, depth=2, embed_dim=64, num_heads=2)


def _cascade(name: str, feature_reuse: bool = True, relation_reuse: bool = True) -> torch.nn.Module:
    """A tiny random cascade in eval mode whose heads give logits of std ~2 on random images.

    At init every image gets nearly the same near-uniform softmax; rescaling the heads spreads the
    confidences over (0, 1) without saturating them.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, feature_reuse=feature_reuse, relation_reuse=relation_reuse, **TINY).eval()
    with torch.no_grad():
        for stage, logits in zip(model.stages, model(torch.randn(16, 3, 64, 64)), strict=True):
            stage.head.weight.mul_(2.0 / logits.std())
    return model


def _separating_thresholds(confidences: np.ndarray) -> list[float]:
    """eta_1, eta_2 sending roughly a third of the samples out at each stage, far from any confidence.

    Each threshold sits in the widest gap between sorted confidences near the wanted quantile, so
    rounding differences between batch sizes (~1e-7) cannot move a sample across it.
    """

    def split(values: np.ndarray, quantile: float) -> float:
        values = np.sort(values)
        n = values.size
        lo = max(1, round(n * quantile) - n // 6)
        hi = min(n - 1, round(n * quantile) + n // 6)
        gaps = values[lo : hi + 1] - values[lo - 1 : hi]
        i = lo + int(np.argmax(gaps))
        assert gaps.max() > 1e-6, "confidences too close to separate robustly"
        return float((values[i] + values[i - 1]) / 2)

    eta1 = split(confidences[0], 2 / 3)
    return [eta1, split(confidences[1][confidences[0] < eta1], 1 / 2), -math.inf]


@pytest.mark.parametrize(
    ("name", "feature_reuse", "relation_reuse"),
    [
        ("dvt_t2t_vit_12", True, True),
        ("dvt_t2t_vit_12", False, True),
        ("dvt_t2t_vit_12", True, False),
        ("dvt_deit_small", True, True),
        ("dvt_deit_small", False, False),
    ],
)
def test_batched_early_exit_equals_simulate_then_threshold(
    name: str, feature_reuse: bool, relation_reuse: bool
) -> None:
    model = _cascade(name, feature_reuse, relation_reuse)
    images = torch.randn(24, 3, 64, 64)
    probs = all_stage_logits(model, images).softmax(dim=-1).numpy()
    confidences = probs.max(axis=-1)
    thresholds = _separating_thresholds(confidences)
    expected_exits = exit_stages(confidences, thresholds)
    assert set(expected_exits.tolist()) == {0, 1, 2}, "the thresholds must use every exit"
    expected_predictions = probs.argmax(axis=-1)[expected_exits, np.arange(24)]

    stage_macs = model.stage_macs()
    result = early_exit(model, images, thresholds, stage_macs)
    assert result.exits.tolist() == expected_exits.tolist()
    assert result.predictions.tolist() == expected_predictions.tolist()
    np.testing.assert_allclose(
        result.confidences.numpy(), confidences[expected_exits, np.arange(24)], rtol=1e-5
    )
    cumulative = np.cumsum(stage_macs)
    assert result.macs.tolist() == cumulative[expected_exits].tolist()


def test_early_exit_only_runs_later_stages_on_the_samples_left() -> None:
    model = _cascade("dvt_t2t_vit_12")
    seen: list[int] = []
    forward_stage = model.forward_stage

    def spy(index, x, upstream=None):  # noqa: ANN001, ANN202
        seen.append(x.shape[0])
        if upstream is not None:
            assert upstream.tokens.shape[0] == upstream.logits.shape[0] == x.shape[0]
        return forward_stage(index, x, upstream)

    model.forward_stage = spy
    images = torch.randn(24, 3, 64, 64)
    thresholds = _separating_thresholds(all_stage_logits(model, images).softmax(-1).amax(-1).numpy())
    seen.clear()
    result = early_exit(model, images, thresholds, [1, 1, 1])
    counts = np.bincount(result.exits.numpy(), minlength=3)
    assert seen == [24, 24 - counts[0], counts[2]]


def test_thresholds_at_the_extremes() -> None:
    model = _cascade("dvt_deit_small").train()
    images = torch.randn(5, 3, 64, 64)
    macs = model.stage_macs()
    everyone_first = early_exit(model, images, [-math.inf, -math.inf], macs)
    assert everyone_first.exits.tolist() == [0] * 5
    assert everyone_first.macs.tolist() == [macs[0]] * 5
    nobody_early = early_exit(model, images, [math.inf, math.inf, 0.0])
    assert nobody_early.exits.tolist() == [2] * 5
    assert nobody_early.macs.tolist() == [sum(macs)] * 5
    assert model.training  # restored


def test_loader_helpers_agree_with_early_exit() -> None:
    model = _cascade("dvt_t2t_vit_12")
    images, labels = torch.randn(12, 3, 64, 64), torch.arange(12) % 10
    loader = [(images[:7], labels[:7]), (images[7:], labels[7:])]
    probs, collected = collect_stage_probs(model, loader, torch.device("cpu"))
    assert probs.shape == (3, 12, 10) and collected.tolist() == labels.tolist()
    thresholds = _separating_thresholds(probs.max(axis=-1))
    macs = model.stage_macs()
    report = evaluate_early_exit(model, loader, thresholds, macs, torch.device("cpu"))
    expected = evaluate_thresholds(probs, labels.numpy(), macs, thresholds)
    assert report["accuracy"] == pytest.approx(expected.accuracy)
    assert report["avg_macs"] == pytest.approx(expected.avg_macs)
    assert report["exit_fractions"] == pytest.approx(expected.exit_fractions.tolist())


def _authors_find_threshold(confidences: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """The loop of the authors' ``dynamic_find_threshold``, with its 1e8 sentinels as infinities."""
    n_stage, n_sample = confidences.shape
    order = np.argsort(-confidences, axis=1, kind="stable")
    filtered = np.zeros(n_sample)
    thresholds = np.full(n_stage, np.inf)
    for k in range(n_stage - 1):
        count, out_n = 0, math.floor(n_sample * proportions[k])
        for i in range(n_sample):
            index = order[k][i]
            if filtered[index] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = confidences[k][index]
                    break
        filtered += confidences[k] >= thresholds[k]
    thresholds[-1] = -np.inf
    return thresholds


def test_msdnet_rule_reproduces_the_target_proportions() -> None:
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, size=(3, 1000))  # continuous: no ties
    _, sweep = proportion_sweep()
    for proportions in sweep:
        thresholds = calibrate_thresholds(confidences, proportions)
        assert thresholds[-1] == -np.inf
        np.testing.assert_array_equal(thresholds, _authors_find_threshold(confidences, proportions))
        fractions = np.bincount(exit_stages(confidences, thresholds), minlength=3) / 1000
        targets = [math.floor(1000 * p) / 1000 for p in proportions[:2]]
        np.testing.assert_allclose(fractions[:2], targets)
        assert fractions[2] == pytest.approx(1 - sum(targets))


def test_proportion_sweep_is_the_authors() -> None:
    qs, proportions = proportion_sweep()
    assert qs.tolist() == [i / 20 for i in range(1, 60)]
    assert proportions.shape == (59, 3)
    np.testing.assert_allclose(proportions.sum(axis=1), 1.0)
    np.testing.assert_allclose(exit_proportions(0.5), np.array([0.5, 0.25, 0.125]) / 0.875)
    assert np.all(np.diff(proportions[:, 0]) < 0)  # larger q keeps more samples for later stages
    np.testing.assert_allclose(proportions[19], [1 / 3] * 3)  # q = 1


def test_holdout_split_is_seeded() -> None:
    held, rest = holdout_split(100, 0.3, seed=7)
    again, _ = holdout_split(100, 0.3, seed=7)
    other, _ = holdout_split(100, 0.3, seed=8)
    assert held.size == 30 and rest.size == 70
    assert np.array_equal(held, again) and not np.array_equal(held, other)
    assert sorted(np.concatenate([held, rest]).tolist()) == list(range(100))
    assert holdout_split(100, 10, seed=0)[0].size == 10
    with pytest.raises(ValueError):
        holdout_split(10, 11, seed=0)


def test_evaluate_thresholds_on_a_hand_example() -> None:
    # Two stages, three samples, two classes.
    probs = np.array(
        [
            [[0.9, 0.1], [0.6, 0.4], [0.55, 0.45]],  # stage 1: sample 0 leaves at eta_1 = 0.8
            [[0.2, 0.8], [0.3, 0.7], [0.1, 0.9]],
        ]
    )
    result = evaluate_thresholds(probs, np.array([0, 0, 1]), [10.0, 30.0], [0.8, -np.inf])
    assert result.accuracy == pytest.approx(200 / 3)  # right on 0 (stage 1) and 2, wrong on 1
    assert result.avg_macs == pytest.approx((10 + 40 + 40) / 3)
    np.testing.assert_allclose(result.exit_fractions, [1 / 3, 2 / 3])
    np.testing.assert_allclose(softmax(np.log(probs)), probs)


def test_budget_curve_and_best_under_budget() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=400)
    # Later stages are more accurate and more confident on average.
    logits = rng.normal(size=(3, 400, 5))
    for k in range(3):
        logits[k, np.arange(400), labels] += 1.0 + k
    probs = softmax(logits)
    held, rest = holdout_split(400, 0.5, seed=0)
    stage_macs = [1.0, 2.0, 4.0]
    curve = budget_curve(probs[:, held], probs[:, rest], labels[rest], stage_macs)
    assert len(curve) == 59 and all(isinstance(point, CurvePoint) for point in curve)
    assert all(1.0 <= point.avg_macs <= 7.0 for point in curve)
    assert curve[0].avg_macs < curve[-1].avg_macs  # small q exits early, large q late
    for budget in (2.0, 3.5, 7.0):
        best = best_under_budget(curve, budget)
        assert best.avg_macs <= budget
        assert best.accuracy == max(p.accuracy for p in curve if p.avg_macs <= budget)
    assert best_under_budget(curve, 7.0).to_dict()["thresholds"][-1] == -math.inf
    with pytest.raises(ValueError, match="cheapest"):
        best_under_budget(curve, 0.5)
