"""Seeds and noise, as pure functions: the spread over seeds, which figure the report shows (last or
best epoch, EMA or raw weights), one variant's seeds merged into one row, and differences smaller
than the between-seed spread flagged in the tables."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from pipeline.report.collect import Measured, Study, VariantResult, merge_seeds, with_figures
from pipeline.report.tables import comparison_table, metrics_json
from pipeline.stats import Spread, noise_neighbours, spread, within_noise


def test_spread_is_mean_sample_std_and_n() -> None:
    s = spread([40.0, 44.0, 45.0])
    assert s.mean == pytest.approx(43.0) and s.n == 3
    assert s.std == pytest.approx(statistics.stdev([40.0, 44.0, 45.0]))  # n - 1 in the denominator
    assert s.text() == f"43.00 ± {s.std:.2f} (n=3)"
    one = spread([41.5, None, math.nan])  # missing values are left out, not counted as zero
    assert one == Spread(41.5, None, 1) and one.text(1) == "41.5"
    assert spread([None]) is None


def test_a_difference_inside_the_seed_spread_is_noise() -> None:
    t2t, vit, far = Spread(45.0, 2.0, 3), Spread(43.5, 1.0, 3), Spread(30.0, 1.0, 3)
    assert within_noise(t2t, vit)  # 1.5 < max(2.0, 1.0)
    assert not within_noise(t2t, far)
    assert not within_noise(Spread(45.0, None, 1), Spread(44.9, None, 1))  # noise unknown: no claim
    assert within_noise(Spread(45.0, None, 1), Spread(44.0, 1.5, 3))  # one side's spread is enough
    near = noise_neighbours({"t2t": t2t, "vit": vit, "far": far})
    assert near == {"t2t": [("vit", 1.5, 2.0)], "vit": [("t2t", 1.5, 2.0)], "far": []}


def _measured(run_id: str, **metrics: float) -> Measured:
    return Measured(
        run_id=run_id,
        experiment_id="1",
        status="FINISHED",
        model="t2t_vit_7",
        model_kwargs={},
        img_size=64,
        epochs=5,
        metrics={"params_m": 4.3, "macs_g": 0.09, "images_per_s": 100.0, **metrics},
        history={},
        tags={},
        url=f"http://ui/#/runs/{run_id}",
    )


def test_the_reported_figure_is_the_last_epoch_of_the_ema_weights_where_there_are_some() -> None:
    raw = _measured("r", val_top1=40.0, val_top5=90.0, best_val_top1=42.0, best_val_top5=91.0)
    ema = _measured("e", val_top1=40.0, val_top5=90.0, ema_val_top1=41.0, ema_val_top5=92.0,
                    best_val_top1=43.0, best_val_top5=93.0)  # fmt: skip
    last_raw, last_ema = with_figures(raw), with_figures(ema)
    assert (last_raw.metric("top1"), last_raw.metric("top5")) == (40.0, 90.0)
    assert (last_ema.metric("top1"), last_ema.metric("top5")) == (41.0, 92.0)
    assert last_raw.figure == "last epoch, raw weights" and last_ema.figure == "last epoch, EMA weights"
    best = with_figures(ema, "best")
    assert (best.metric("top1"), best.metric("top5")) == (43.0, 93.0)
    assert best.figure == "best validation epoch, EMA weights"
    assert with_figures(_measured("old", val_top1=40.0), "best").metric("top1") is None  # not logged


def test_merged_seeds_keep_the_first_run_and_average_every_metric() -> None:
    runs = [with_figures(_measured(f"run{k}", val_top1=v, val_top5=90.0)) for k, v in enumerate([40, 44, 45])]
    merged = merge_seeds(runs)
    assert merged.run_id == "run0" and merged.url == runs[0].url and merged.runs == ("run0", "run1", "run2")
    assert merged.n == 3 and merged.metric("top1") == pytest.approx(43.0)
    assert merged.spread["top1"] == spread([40, 44, 45]) and merged.spread["top5"].std == 0.0
    assert merged.spread_text("top1") == spread([40, 44, 45]).text()
    single = merge_seeds(runs[:1])
    assert single.n == 1 and single.runs == () and single.spread_text("top1") is None
    assert single.metrics == runs[0].metrics


def _study(**variants: list[float]) -> Study:
    results = []
    for name, values in variants.items():
        runs = [
            with_figures(_measured(f"{name}{k}", val_top1=v, val_top5=95.0)) for k, v in enumerate(values)
        ]
        results.append(VariantResult(name, Path(f"results/{name}.json"), merge_seeds(runs)))
    return Study(results, [], "sqlite:///mlflow.db", "http://ui")


def test_the_comparison_table_shows_mean_std_n_and_flags_noise() -> None:
    table = comparison_table(_study(t2t_vit_7=[45.0, 47.0, 43.0], vit_7=[44.0, 42.0, 43.0], big=[60.0, 61.0]))
    rows = {r["variant"]: r for r in table.rows}
    assert {c.key for c in table.shown} >= {"seeds", "within_noise"}
    top1 = next(c for c in table.columns if c.key == "top1")
    assert table.cell(rows["t2t_vit_7"], top1) == "45.00 ± 2.00 (n=3)"
    assert rows["t2t_vit_7"]["top1"] == pytest.approx(45.0) and rows["t2t_vit_7"]["top1_std"] == 2.0
    assert rows["t2t_vit_7"]["seeds"] == 3 and rows["big"]["seeds"] == 2
    # 45 - 43 = 2.00 is not smaller than the larger spread (2.00): not flagged; 60.5 is far from both.
    assert [r["within_noise"] for r in table.rows] == ["", "", ""]
    assert "mean ± sample standard deviation" in table.caption and "last epoch" in table.caption
    close = comparison_table(_study(t2t_vit_7=[45.0, 47.0, 43.0], vit_7=[44.0, 45.0, 43.0]))
    flagged = {r["variant"]: r["within_noise"] for r in close.rows}
    assert flagged == {"t2t_vit_7": "vit_7 (Δ 1.00 < 2.00)", "vit_7": "t2t_vit_7 (Δ 1.00 < 2.00)"}
    metrics = metrics_json(_study(), [close, *_empty_dvt_tables()])["variants"]
    assert metrics["t2t_vit_7"]["seeds"] == 3 and metrics["t2t_vit_7"]["top1_std"] == pytest.approx(2.0)
    assert metrics["vit_7"]["top1"] == pytest.approx(44.0)


def _empty_dvt_tables() -> list:
    from pipeline.report.table import Table

    return [Table(name, "", "", []) for name in ("dvt_budgets", "dvt_speed", "dvt_reuse")]


def test_one_seed_shows_plain_numbers_and_no_seed_columns() -> None:
    table = comparison_table(_study(t2t_vit_7=[45.0], vit_7=[44.9]))
    shown = {c.key for c in table.shown}
    assert "seeds" not in shown and "within_noise" not in shown
    top1 = next(c for c in table.columns if c.key == "top1")
    assert table.cell(table.rows[0], top1) == "45.00"
    assert "standard deviation" not in table.caption


def test_the_best_epoch_figure_is_called_optimistic() -> None:
    study = _study(t2t_vit_7=[45.0])
    best = Study(study.variants, [], study.tracking_uri, study.ui_base, epoch="best")
    assert "overstates" in comparison_table(best).caption
    assert "overstates" not in comparison_table(study).caption


def test_the_results_file_lists_every_seed_and_summarises_the_reported_figure(root: Path) -> None:
    import yaml

    from pipeline.config import parse_config
    from pipeline.train.results import results_record

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(seeds=[0, 1, 2], ema_decay=0.999)
    cfg = parse_config(raw)
    runs = [
        {"seed": s, "run_id": f"r{s}", "model": "t2t_vit_7", "params_m": 4.3, "macs_g": 0.09,
         "val_top1": 40.0 + s, "val_top5": 90.0, "ema_val_top1": 41.0 + 2 * s, "ema_val_top5": 91.0,
         "best_val_top1": 45.0, "best_val_top5": 92.0, "best_epoch": 3, "images_per_s": 100.0}
        for s in (0, 1, 2)
    ]  # fmt: skip
    record = results_record(cfg, "t2t_vit_7", runs)
    assert record["seeds"] == [0, 1, 2] and record["n"] == 3 and record["runs"] == runs
    assert record["run_id"] == "r0" and record["weights"] == "ema" and record["reported"] == "last epoch"
    top1 = record["summary"]["top1"]
    assert top1["metric"] == "ema_val_top1"  # the EMA weights are the reported ones
    assert (top1["mean"], top1["std"], top1["n"]) == (43.0, 2.0, 3)
    assert record["val_top1"] == 43.0 and record["val_top1_std"] == 2.0
    assert record["summary"]["best_top1"]["mean"] == 45.0 and record["summary"]["best_top1"]["std"] == 0.0
    raw["train"].update(seeds=[0], ema_decay=None)
    one = results_record(parse_config(raw), "t2t_vit_7", runs[:1])
    assert one["summary"]["top1"] == {
        "mean": 40.0,
        "std": None,
        "n": 1,
        "text": "40.00",
        "metric": "val_top1",
    }
