"""The report reads only the current study and puts the papers' numbers beside the measured ones.

Real MLflow (a temporary SQLite store, runs and per-epoch histories made with MlflowClient), real
results files (the DVT ones written by the tune_dvt stage's own writer), real output files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from helpers import (
    DVT_VARIANT,
    EPOCHS,
    EXPERIMENT,
    STAGE_GMACS,
    UI,
    VARIANTS,
    StudyFiles,
    make_study,
    parse_page,
)

from pipeline.models.dvt import DVT_PAPER
from pipeline.models.paper import PAPER
from pipeline.report import ReportError, build_report, collect
from pipeline.report.dvt import BUDGET_FRACTIONS
from pipeline.report.paper import CNN_TO_VIT_ROWS, DEMO_SCALE
from pipeline.report.plots import FIGURES


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    return make_study(tmp_path_factory.mktemp("report") / "study")


@pytest.fixture(scope="module")
def built(study: StudyFiles) -> Path:
    """The report of the whole study, built once."""
    out = study.base / "reports"
    build_report(study.results, [v[0] for v in VARIANTS], study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _by_variant(path: Path) -> dict[str, dict[str, str]]:
    return {r["variant"]: r for r in _csv(path) if r["variant"]}


# -- what is written --------------------------------------------------------------------------------


def _declared_outputs(root: Path) -> list[str]:
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["report"]
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in stage.get(section, []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return [p.replace("${report.output}/", "") for p in paths]


def test_every_output_dvc_yaml_declares_is_written(root: Path, built: Path) -> None:
    declared = _declared_outputs(root)
    assert "index.html" in declared and "metrics.json" in declared
    for rel in declared:
        path = built / rel
        assert path.exists(), f"dvc.yaml declares {rel}, which build_report did not write"
        assert path.is_dir() and any(path.iterdir()) or path.stat().st_size > 0, rel
    written = {p.name for p in built.iterdir()}
    assert written <= set(declared) | {"curves"}, f"written but not declared: {written - set(declared)}"


def test_tables_are_markdown_csv_and_parquet_with_the_same_rows(built: Path) -> None:
    import pyarrow.parquet as pq

    for name in ("comparison", "paper_t2t_vs_vit", "cnn_to_vit", "dvt_budgets", "dvt_speed", "dvt_reuse"):
        rows = _csv(built / f"{name}.csv")
        table = pq.read_table(built / f"{name}.parquet")
        assert table.column_names == list(rows[0]) and table.num_rows == len(rows) > 0, name
        for col in table.column_names:
            values = table.column(col).to_pylist()
            for text, value in zip((r[col] for r in rows), values, strict=True):
                if value is None:
                    assert text == "", (name, col)
                elif isinstance(value, float):
                    assert float(text) == pytest.approx(value), (name, col)
                elif isinstance(value, bool):
                    assert text == str(value)
                else:
                    assert text == str(value), (name, col)
        assert (built / f"{name}.md").read_text().startswith("# ")


def test_figures_are_png_and_svg(built: Path) -> None:
    for figure in FIGURES:
        png = (built / f"{figure.name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, figure.name
        svg = ET.parse(built / f"{figure.name}.svg").getroot()
        assert svg.tag.endswith("svg"), figure.name


# -- only the current study ------------------------------------------------------------------------


def test_rows_come_from_the_runs_the_results_files_name(study: StudyFiles, built: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(study.uri)
    same_name = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.variant = 't2t_vit_7'"
    )
    assert {r.info.run_id for r in same_name} == {study.runs["t2t_vit_7"], study.stale_run}

    rows = _csv(built / "comparison.csv")
    assert [r["variant"] for r in rows] == [v[0] for v in VARIANTS]
    for (name, model, _, img, params_m, macs_g, top1), row in zip(VARIANTS, rows, strict=True):
        assert row["run_id"] == study.runs[name] and row["model"] == model and row["status"] == "measured"
        # The last epoch's numbers, read from MLflow (the results files hold -1 on purpose).
        assert float(row["top1"]) == pytest.approx(top1)
        assert float(row["params_m"]) == pytest.approx(params_m) and float(row["macs_g"]) == pytest.approx(
            macs_g
        )
        assert float(row["images_per_s"]) == pytest.approx(100.0 + EPOCHS - 1) and row["img_size"] == str(img)
    for path in built.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".csv", ".json", ".html"):
            text = path.read_text(encoding="utf-8")
            assert study.stale_run not in text and "12.50" not in text and "13.50" not in text, path
    metrics = json.loads((built / "metrics.json").read_text())
    assert list(metrics["variants"]) == [v[0] for v in VARIANTS]
    assert metrics["variants"]["t2t_vit_7"]["top1"] == pytest.approx(61.0)


def test_a_variant_without_results_is_missing_not_an_error(study: StudyFiles, tmp_path: Path) -> None:
    s = study.copy(tmp_path / "study")
    (s.results / "vit_7.json").unlink()
    out = tmp_path / "reports"
    build_report(s.results, [v[0] for v in VARIANTS], s.uri, out, ui_url=UI)
    rows = _by_variant(out / "comparison.csv")
    assert rows["vit_7"]["status"] == "missing" and rows["vit_7"]["top1"] == ""
    assert rows["t2t_vit_7"]["status"] == "measured"
    assert "| vit_7 | missing |" in (out / "comparison.md").read_text()
    assert "vit_7" not in json.loads((out / "metrics.json").read_text())["variants"]
    page = parse_page(out / "index.html")
    [(_, attrs)] = [(t, a) for t, a in page.rows if t == "comparison" and a.get("data-variant") == "vit_7"]
    assert attrs["class"] == "missing" and "_links" not in attrs
    assert not (out / "curves" / "vit_7.csv").exists() and (out / "curves" / "t2t_vit_7.csv").exists()


@pytest.mark.parametrize("how", ["never existed", "deleted"])
def test_a_results_file_whose_run_is_gone_is_an_error_naming_both(
    study: StudyFiles, tmp_path: Path, how: str
) -> None:
    from mlflow.tracking import MlflowClient

    s = study.copy(tmp_path / "study")
    path = s.results / "vit_7.json"
    if how == "deleted":
        MlflowClient(s.uri).delete_run(s.runs["vit_7"])
        gone = s.runs["vit_7"]
    else:
        gone = "0" * 32
        path.write_text(json.dumps({**json.loads(path.read_text()), "run_id": gone}))
    with pytest.raises(ReportError) as err:
        collect(s.results, [v[0] for v in VARIANTS], s.uri)
    assert str(path) in str(err.value) and gone in str(err.value)


def test_the_stage_fails_in_one_line_naming_the_file_and_the_run(
    root: Path, study: StudyFiles, tmp_path: Path
) -> None:
    s = study.copy(tmp_path / "study")
    path = s.results / "t2t_vit_7.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "run_id": "f" * 32}))
    shutil.copy(root / "dvc.yaml", s.base / "dvc.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    (s.base / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": s.uri, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.report"],
        cwd=s.base,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert str(path) in proc.stderr and "f" * 32 in proc.stderr and "Traceback" not in proc.stderr


def test_dvt_tuned_on_another_training_is_stale_and_not_shown(study: StudyFiles, tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.dvt.records import TuneRecord

    s = study.copy(tmp_path / "study")
    path = s.results / "dvt" / DVT_VARIANT / "best.yaml"
    replace(TuneRecord.read(path), trained_run_id=s.stale_run).write(path)
    result = collect(s.results, [v[0] for v in VARIANTS], s.uri, cascades=[DVT_VARIANT, "dvt_never_tuned"])
    assert [d.status for d in result.dvt] == ["stale", "missing"] and s.stale_run in result.dvt[0].note

    from pipeline.report.dvt import dvt_budget_table, dvt_reuse_table

    assert dvt_budget_table(result).rows == [] and dvt_reuse_table(result).rows == []


# -- the papers' numbers beside ----------------------------------------------------------------------


def test_paper_numbers_only_beside_the_papers_model(built: Path) -> None:
    rows = _by_variant(built / "comparison.csv")
    t14 = rows["t2t_vit_14"]  # the paper's model at the paper's resolution: every number beside
    assert float(t14["paper_top1"]) == PAPER["t2t_vit_14"]["top1"]
    assert float(t14["paper_params_m"]) == PAPER["t2t_vit_14"]["params_m"]
    assert float(t14["paper_macs_g"]) == PAPER["t2t_vit_14"]["macs_g"]
    t7 = rows["t2t_vit_7"]  # the paper's model at 64 px: its parameters, not its 224-px MACs
    assert float(t7["paper_params_m"]) == PAPER["t2t_vit_7"]["params_m"] and t7["paper_macs_g"] == ""
    assert t7["paper_img_size"] == "224" and "64 px" in t7["paper_note"]
    for demo in ("vit_7", "dvt_t2t_vit_7"):  # model_kwargs change the size: not the paper's model
        r = rows[demo]
        assert r["paper_top1"] == r["paper_params_m"] == r["paper_macs_g"] == ""
        assert r["paper_note"].startswith(DEMO_SCALE)
    md = {
        line.split("|")[1].strip(): line
        for line in (built / "comparison.md").read_text().splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert md["vit_7"].count(DEMO_SCALE) == 3 and md["dvt_t2t_vit_7"].count(DEMO_SCALE) == 3
    assert "| 81.5 | 21.5 | 4.8 |" in md["t2t_vit_14"]
    assert "n/a (paper at 224 px)" in md["t2t_vit_7"] and "| 71.7 | 4.2 |" in md["t2t_vit_7"]
    assert float(t7["paper_top1"]) == 71.7  # published in the authors' README, not in the paper
    assert "top-1 from github.com/yitu-opensource/T2T-ViT" in t7["paper_note"]
    assert "not published" not in (built / "comparison.md").read_text()


def test_every_published_t2t_vit_top1_is_in_the_report_with_its_source(built: Path) -> None:
    rows = {r["paper_model"]: r for r in _csv(built / "paper_t2t_vs_vit.csv")}
    t2t = [key for key, entry in PAPER.items() if entry["model"].startswith("t2t_vit_") and key in rows]
    assert set(t2t) >= {"t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_14@384", "t2t_vit_19",
                        "t2t_vit_24", "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24"}  # fmt: skip
    for key in t2t:
        assert float(rows[key]["top1"]) == PAPER[key]["top1"], key
        source = rows[key]["top1_source"]
        assert source == PAPER[key]["top1_source"] and ("2101.11986" in source or "README" in source), key
    md = (built / "paper_t2t_vs_vit.md").read_text()
    assert "| T2T-ViT_t-24 | 224 | 82.6 |" in md and "github.com/yitu-opensource/T2T-ViT README" in md


def test_every_measured_row_names_its_counting_convention(built: Path) -> None:
    for name, _, _, img, *_ in VARIANTS:
        row = _by_variant(built / "comparison.csv")[name]
        assert row["counting"] == f"params: all tensors; MACs: all-matmul at {img} px"
    for row in _csv(built / "cnn_to_vit.csv"):
        if row["source"] == "measured":
            assert "all-matmul at" in row["note"]


def test_cnn_to_vit_has_the_papers_rows_and_the_variants_under_them(built: Path, study: StudyFiles) -> None:
    rows = _csv(built / "cnn_to_vit.csv")
    paper = [r for r in rows if r["source"] == "paper"]
    assert [r["paper_model"] for r in paper] == [key for _, key, _ in CNN_TO_VIT_ROWS]
    for r in paper:
        assert float(r["top1"]) == PAPER[r["paper_model"]]["top1"]
        assert float(r["params_m"]) == PAPER[r["paper_model"]]["params_m"]
    i = next(i for i, r in enumerate(rows) if r["paper_model"] == "vit_s16_paper")
    assert rows[i + 1]["variant"] == "vit_7" and rows[i + 1]["run_id"] == study.runs["vit_7"]
    assert rows[i + 1]["note"].startswith(DEMO_SCALE)
    j = next(i for i, r in enumerate(rows) if r["paper_model"] == "t2t_vit_14")
    assert rows[j + 1]["variant"] == "t2t_vit_14" and float(rows[j + 1]["top1"]) == pytest.approx(70.0)
    assert not any(r["variant"] in ("t2t_vit_7", DVT_VARIANT) for r in rows)


def test_paper_table_lists_the_variants_training_each_model(built: Path) -> None:
    rows = {r["paper_model"]: r for r in _csv(built / "paper_t2t_vs_vit.csv")}
    assert rows["vit_s16_paper"]["trained_as"] == "vit_7 (demo-scale)"
    assert rows["t2t_vit_14"]["trained_as"] == "t2t_vit_14" and rows["vit_b16_paper"]["trained_as"] == ""
    assert float(rows["t2t_vit_14@384"]["top1"]) == PAPER["t2t_vit_14@384"]["top1"]


# -- DVT ---------------------------------------------------------------------------------------------


def test_dvt_accuracy_at_each_budget_is_the_calibration_best_sweep_point_within_it(
    built: Path, study: StudyFiles
) -> None:
    from pipeline.dvt.records import TuneRecord

    record = TuneRecord.read(study.results / "dvt" / DVT_VARIANT / "best.yaml")
    rows = _csv(built / "dvt_budgets.csv")
    full = sum(STAGE_GMACS)
    budgets = [r for r in rows if r["key"].startswith("budget_")]
    assert [float(r["budget_fraction"]) for r in budgets] == list(BUDGET_FRACTIONS)
    for r in budgets:
        budget = float(r["budget_fraction"]) * full
        fits = [p for p in record.curve if p.calib_avg_gmacs <= budget + 1e-12]
        if not fits:
            assert r["top1"] == ""
            continue
        assert float(r["calib_top1"]) == pytest.approx(max(p.calib_accuracy for p in fits))
        assert sum(float(r[f"exit{k}"]) for k in (1, 2, 3)) == pytest.approx(1.0)
        # calibration: train, so every static model is on the same (all val) images
        static = [(top1, n) for n, _, _, _, _, macs, top1 in VARIANTS if n != DVT_VARIANT and macs <= budget]
        assert r["static_variant"] == (max(static)[1] if static else "none")
    tuned = {r["key"]: r for r in rows if r["key"] in ("msdnet", "optuna")}
    for search, row in tuned.items():
        assert float(row["top1"]) == pytest.approx(getattr(record, search).accuracy)
        assert float(row["eta1"]) == pytest.approx(getattr(record, search).thresholds[0])
    exits = [r for r in rows if r["key"].startswith("exit")]
    for k, r in enumerate(exits, start=1):
        assert float(r["top1"]) == pytest.approx(record.exit_top1[k - 1])  # on the reported images
        assert float(r["avg_gmacs"]) == pytest.approx(sum(STAGE_GMACS[:k]))
        assert r["paper_top1"] == "" and r["run_id"] == study.tune_run
    assert DEMO_SCALE in (built / "dvt_budgets.md").read_text()
    assert (
        "all 120 val images (thresholds calibrated on 120 training images)"
        in (built / "dvt_budgets.md").read_text()
    )
    assert set(DVT_PAPER) >= {"dvt_t2t_vit_12"}


def test_reuse_ablation_has_every_combination(built: Path, study: StudyFiles) -> None:
    rows = _csv(built / "dvt_reuse.csv")
    assert [(r["feature_reuse"], r["relation_reuse"]) for r in rows] == [
        ("True", "True"),
        ("True", "False"),
        ("False", "True"),
        ("False", "False"),
    ]
    assert [float(r["delta_pts"]) for r in rows] == [0.0, -2.0, -4.0, -6.0]
    assert [float(r["paper_delta_pts"]) for r in rows] == [0.0, -2.0, -2.0, -4.0]
    names = {run_id: name for name, run_id in study.trials.items()}
    flags = (("on", "on"), ("on", "off"), ("off", "on"), ("off", "off"))
    assert [names[r["run_id"]] for r in rows] == [f"feature reuse {f}, relation reuse {r}" for f, r in flags]
    # The caption says how little each trial trained (the record holds it).
    assert "1 epoch(s) of at most 20 optimizer steps on 1 worker(s)" in (built / "dvt_reuse.md").read_text()
    budget_rows = _csv(built / "dvt_budgets.csv")
    assert {r["run_id"] for r in budget_rows} == {study.tune_run}
    metrics = json.loads((built / "metrics.json").read_text())["dvt"][DVT_VARIANT]
    assert metrics["reuse_top1"]["feature1_relation1"] == 40.0
    assert {"budget_100pct", "msdnet", "optuna", "exit1", "exit3"} <= set(metrics)


# -- the HTML page -----------------------------------------------------------------------------------


def test_html_is_self_contained_and_links_every_measured_row_to_its_run(
    built: Path, study: StudyFiles
) -> None:
    from mlflow.tracking import MlflowClient

    page = parse_page(built / "index.html")
    assert {"comparison", "paper_t2t_vs_vit", "cnn_to_vit", "dvt_budgets", "dvt_reuse", "provenance"} <= set(
        page.tables
    )
    assert len(page.images) == len(FIGURES) and all(
        s.startswith("data:image/svg+xml;base64,") for s in page.images
    )
    assert not page.tags & {"script", "link", "iframe", "object"}
    html = (built / "index.html").read_text(encoding="utf-8")
    assert "url(" not in html and 'src="http' not in html
    targets = (f"{UI}/#/experiments/", f"{UI}/#/models/", "#")
    assert all(link.startswith(targets) or link == UI for link in page.links)
    # Each measured variant's registered model (models:/<variant>@best), linked once.
    models = [link for link in page.links if "/#/models/" in link]
    assert models == [f"{UI}/#/models/{v[0]}" for v in VARIANTS]
    exp = MlflowClient(study.uri).get_experiment_by_name(EXPERIMENT).experiment_id
    rows = [a for t, a in page.rows if t == "comparison" and "data-variant" in a]
    assert [a["data-variant"] for a in rows] == [v[0] for v in VARIANTS]
    for attrs in rows:
        run = study.runs[attrs["data-variant"]]
        assert attrs["_links"].split() == [f"{UI}/#/experiments/{exp}/runs/{run}"]
    measured = [a for t, a in page.rows if t == "cnn_to_vit" and a.get("class") == "measured"]
    assert len(measured) == 2 and all(len(a["_links"].split()) == 1 for a in measured)
    for table in ("dvt_budgets", "dvt_reuse"):
        body = [a for t, a in page.rows if t == table][1:]  # after the header row
        assert body and all(f"{UI}/#/experiments/{exp}/runs/" in a.get("_links", "") for a in body), table


def test_run_links_follow_mlflow_ui_url(study: StudyFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_UI_URL", "https://mlflow.internal/")
    result = collect(study.results, ["t2t_vit_7"], study.uri)
    assert result.variants[0].measured.url.startswith("https://mlflow.internal/#/experiments/")
    monkeypatch.delenv("MLFLOW_UI_URL")
    result = collect(study.results, ["t2t_vit_7"], study.uri)
    assert result.variants[0].measured.url.startswith("http://127.0.0.1:5000/#/experiments/")


def test_training_curves_come_from_the_metric_history(built: Path) -> None:
    rows = _csv(built / "curves" / "t2t_vit_7.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [float(r["val_top1"]) for r in rows] == pytest.approx(
        [61.0 * (e + 1) / EPOCHS for e in range(EPOCHS)]
    )
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([1.5 - 0.2 * e for e in range(EPOCHS)])
