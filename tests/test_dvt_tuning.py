"""DVT tuning without Ray: the image sets, the operating points, the record, the report's DVT rows.

The key property: no choice looks at the reported images. Shuffling the reported labels (or
replacing them) leaves every chosen threshold and every chosen report row unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pipeline.config import ConfigError, DVTConfig, parse_config
from pipeline.dvt.images import ImageSet, image_sets, iter_batches
from pipeline.dvt.points import best_within, cheapest_reaching, score_point, sweep
from pipeline.dvt.records import (
    ReuseAblation,
    ReuseTrial,
    SpeedRow,
    StaticScore,
    Throughput,
    TuneRecord,
)
from pipeline.dvt.speed import time_early_exit, time_simulate_all, time_static
from pipeline.report.collect import DVTResult, Measured, Study, VariantResult
from pipeline.report.dvt import dvt_budget_table, dvt_reuse_table, dvt_speed_table

STAGE_MACS = [0.03e9, 0.057e9, 0.093e9]


def _probs(n: int, seed: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of a 3-stage cascade whose later stages are more often right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(3, n, classes)) + np.arange(1, 4)[:, None, None] * np.eye(classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return probs.astype(np.float32), labels


def _record(reported: tuple[np.ndarray, np.ndarray], calib: tuple[np.ndarray, np.ndarray]) -> TuneRecord:
    curve = sweep(calib, reported, STAGE_MACS)
    static = StaticScore("t2t_vit_7", "t2t_vit_7", "static-run", 0.098, calib_accuracy=55.0, accuracy=54.0)
    return TuneRecord(
        variant="dvt_tiny", model="dvt_t2t_vit_12", run_id="tune-run", trained_run_id="train-run",
        img_size=64,
        calibration="val", calibration_images=calib[1].size, reported_images=reported[1].size,
        budget_gmacs=0.06, stage_gmacs=[m / 1e9 for m in STAGE_MACS],
        exit_top1=[100.0 * float(np.mean(p.argmax(-1) == reported[1])) for p in reported[0]],
        curve=curve, msdnet=best_within(curve, 0.06),
        optuna=score_point([0.7, 0.6, -np.inf], calib, reported, STAGE_MACS),
        match_static=cheapest_reaching(curve, static.calib_accuracy), static=static,
        reuse=ReuseAblation(1, 20, 1, [ReuseTrial(f, r, 40.0 - 2 * i, [30.0, 35.0, 40.0], f"trial{i}")
                                       for i, (f, r) in enumerate([(True, True), (True, False), (False, True),
                                                                   (False, False)])]),
        throughput=Throughput("cpu", "float32", 2, 32, 1, 3, [
            SpeedRow("early_exit", "budget", 900.0, 50.0, 0.05, [0.6, 0.3, 0.1]),
            SpeedRow("simulate_all", "budget", 300.0, 50.0, 0.18, [0.6, 0.3, 0.1]),
            SpeedRow("static", "full", 600.0, 54.0, 0.098)]),
    )  # fmt: skip


def _study(record: TuneRecord) -> Study:
    def measured(model: str, top1: float, macs: float, exits: int) -> Measured:
        metrics = {"val_top1": top1, "macs_g": macs} | {
            f"val_top1_exit{k}": top1 for k in range(1, exits + 1)
        }
        return Measured("run-" + model, "0", "FINISHED", model, {"depth": 7}, 64, 4, metrics, {}, {}, "")

    variants = [
        VariantResult("t2t_vit_7", Path("results/t2t_vit_7.json"), measured("t2t_vit_7", 61.0, 0.098, 1)),
        VariantResult("dvt_tiny", Path("results/dvt_tiny.json"), measured("dvt_t2t_vit_12", 64.0, 0.18, 3)),
    ]
    return Study(variants, [DVTResult("ok", "dvt_tiny", record=record, url="u")], "sqlite://", "http://ui")


def test_no_choice_looks_at_the_reported_labels() -> None:
    calib, reported = _probs(300, 0), _probs(200, 1)
    record = _record(reported, calib)
    shuffled = np.random.default_rng(7).permutation(reported[1])
    other = _record((reported[0], shuffled), calib)
    # Thresholds and chosen points are identical; only their reported accuracy moves.
    assert [p.thresholds for p in other.curve] == [p.thresholds for p in record.curve]
    for name in ("msdnet", "optuna", "match_static"):
        assert getattr(other, name).thresholds == getattr(record, name).thresholds
        assert getattr(other, name).calib_accuracy == getattr(record, name).calib_accuracy
    assert other.msdnet.accuracy != record.msdnet.accuracy  # the shuffle did change what is reported
    # ... and so are the report's rows: the same settings at every budget.
    rows, other_rows = (dvt_budget_table(_study(r)).rows for r in (record, other))
    chosen = [(r["key"], r.get("eta1"), r.get("eta2"), r.get("avg_gmacs")) for r in rows]
    assert chosen == [(r["key"], r.get("eta1"), r.get("eta2"), r.get("avg_gmacs")) for r in other_rows]


def test_budget_rows_pick_on_calibration_accuracy_and_cost() -> None:
    calib, reported = _probs(300, 0), _probs(200, 1)
    record = _record(reported, calib)
    rows = {r["key"]: r for r in dvt_budget_table(_study(record)).rows}
    for fraction in (0.25, 0.5, 0.75, 1.0):
        budget = fraction * record.full_gmacs
        fits = [p for p in record.curve if p.calib_avg_gmacs <= budget + 1e-12]
        row = rows[f"budget_{round(100 * fraction)}pct"]
        if not fits:
            assert row.get("top1") is None
            continue
        assert row["calib_top1"] == max(p.calib_accuracy for p in fits)
        picked = next(p for p in record.curve if p.q == row["q"])
        assert row["top1"] == picked.accuracy and row["avg_gmacs"] == picked.avg_gmacs
    assert rows["static"]["top1"] == 54.0  # the backbone on the same reported images
    # With val calibration, the other static model (scored on all of val in training) is not compared.
    assert {r["static_variant"] for r in rows.values() if "static_variant" in r} <= {"t2t_vit_7", "none"}
    assert rows["exit3"]["top1"] == record.exit_top1[2]


def test_speed_and_reuse_tables_carry_the_record_and_the_paper() -> None:
    record = _record(_probs(200, 1), _probs(300, 0))
    speed = dvt_speed_table(_study(record)).rows
    measured = {r["key"]: r for r in speed if r["source"] == "measured"}
    assert measured["early_exit_budget"]["speedup"] == pytest.approx(1.5)
    assert measured["early_exit_budget"]["ideal"] == pytest.approx(0.098 / 0.05)
    assert [r["images_per_s"] for r in speed if r["source"] == "paper"] == [619, 877, 382, 666]
    reuse = dvt_reuse_table(_study(record)).rows
    assert [r["delta_pts"] for r in reuse] == [0.0, -2.0, -4.0, -6.0]
    assert [r["paper_delta_pts"] for r in reuse] == [0.0, -2.0, -2.0, -4.0]


def test_record_round_trips_and_a_bad_file_is_named(tmp_path: Path) -> None:
    record = _record(_probs(200, 1), _probs(300, 0))
    record.write(tmp_path / "best.yaml")
    assert TuneRecord.read(tmp_path / "best.yaml") == record
    (tmp_path / "bad.yaml").write_text("variant: x\nsurprise: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not a tune_dvt record.*re-run"):
        TuneRecord.read(tmp_path / "bad.yaml")


def test_image_sets_follow_the_protocol(tiny_shards: Path) -> None:
    dvt = DVTConfig(variants=["x"], budget_gmacs=1.0, calibration="train", calibration_images=20, seed=3)
    calib, reported = image_sets(dvt, str(tiny_shards))
    assert (calib.split, len(calib), reported.split, len(reported)) == ("train", 20, "val", 16)
    assert list(reported.indices) == list(range(16))
    assert image_sets(dvt, str(tiny_shards))[0].indices.tolist() == calib.indices.tolist()  # seeded
    val = dvt.model_copy(update={"calibration": "val", "calibration_images": 6})
    calib, reported = image_sets(val, str(tiny_shards))
    assert calib.split == reported.split == "val" and (len(calib), len(reported)) == (6, 10)
    assert not set(calib.indices) & set(reported.indices)
    with pytest.raises(ValueError, match="dvt.calibration_images is 16 .* 16 images, leaving none"):
        image_sets(val.model_copy(update={"calibration_images": 16}), str(tiny_shards))
    with pytest.raises(ValueError, match="dvt.calibration_images is 99 .* training split holds 48"):
        image_sets(dvt.model_copy(update={"calibration_images": 99}), str(tiny_shards))


def test_iter_batches_yields_exactly_the_chosen_samples(tiny_shards: Path) -> None:
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    everything = torch.cat(
        [y for _, y in iter_batches(str(tiny_shards), ImageSet("val", np.arange(16)), tf, 5)]
    )
    chosen = np.array([1, 4, 5, 11])
    batches = list(iter_batches(str(tiny_shards), ImageSet("val", chosen), tf, 3))
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert torch.cat([y for _, y in batches]).tolist() == everything[chosen].tolist()


def test_dvt_config_names_bad_cascades() -> None:
    base = {"variants": {"a": {"model": "t2t_vit_7"}, "d": {"model": "dvt_t2t_vit_12"}}}
    with pytest.raises(ConfigError, match=r"reuse_ablation names \['a'\]"):
        parse_config({**base, "dvt": {"variants": ["d"], "budget_gmacs": 1.0, "reuse_ablation": ["a"]}})
    with pytest.raises(ConfigError, match=r"budget_gmacs gives no budget for \['d'\]"):
        parse_config({**base, "dvt": {"variants": ["d"], "budget_gmacs": {"x": 1.0}}})
    with pytest.raises(ConfigError, match=r"dvt.backbones.d: 'nope' is not a key of variants"):
        parse_config({**base, "dvt": {"variants": ["d"], "budget_gmacs": 1.0, "backbones": {"d": "nope"}}})


def test_speed_functions_run_every_way_on_one_batch() -> None:
    torch.manual_seed(0)
    cascade = timm.create_model(
        "dvt_t2t_vit_12", num_classes=4, img_size=64, depth=1, embed_dim=32, num_heads=2
    )
    static = timm.create_model("t2t_vit_7", num_classes=4, img_size=64, depth=1, embed_dim=32, num_heads=2)
    images = torch.randn(8, 3, 64, 64)
    macs = cascade.stage_macs(64)
    assert time_early_exit(cascade, images, [0.0, 0.0, -np.inf], macs, warmup=1, repeats=2) > 0
    assert time_simulate_all(cascade, images, [0.5, 0.5, -np.inf], warmup=0, repeats=1) > 0
    assert time_static(static, images, warmup=0, repeats=1) > 0
    assert cascade.training and static.training  # modes restored
