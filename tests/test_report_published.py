"""Published checkpoints in the report: a column group of comparison (with the difference to the paper),
their own table linking each row to its MLflow run, and a DVT checkpoint's curve beside the authors'.

Real MLflow (the helpers' SQLite study), real results files as the evaluate stage writes them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import DVT_VARIANT, EXPERIMENT, UI, VARIANTS, make_study, parse_page
from mlflow.tracking import MlflowClient

from pipeline.models.paper import PAPER
from pipeline.report import build_report


def _evaluated(results: Path, client: MlflowClient, name: str, model: str, img_size: int, **extra) -> str:
    """A record as the evaluate stage writes it, with its MLflow run."""
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.create_run(experiment, run_name=f"evaluate-{name}", tags={"pretrained": name}).info.run_id
    record = {
        "name": name,
        "model": model,
        "run_id": run,
        "img_size": img_size,
        "crop_pct": 0.9,
        "images": 50000,
        "top1": 80.91,
        "top5": 95.4,
        "images_per_s": 812.0,
        "checkpoint_sha256": "ab" * 32,
        "exits_top1": [],
        "curve": [],
        "published": None,
        **extra,
    }
    (results / "pretrained").mkdir(exist_ok=True)
    (results / "pretrained" / f"{name}.json").write_text(json.dumps(record))
    return run


def test_published_checkpoints_beside_paper_and_trainings(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    client = MlflowClient(study.uri)
    t2t = _evaluated(study.results, client, "t2t_vit_14", "t2t_vit_14", 224)
    curve = [{"avg_gmacs": 1.0 + i / 10, "top1": 70.0 + i} for i in range(5)]
    published = {
        "flops": [0.47, 1.45, 3.46],
        "anytime_classification": [70.0, 76.0, 78.8],
        "dynamic_threshold": [[0.9, 0.8, -1e8]],
        "budgeted_batch_classification": [[0.6, 1.0, 2.0], [72.0, 76.0, 78.0]],
    }
    _evaluated(
        study.results, client, "dvt12", "dvt_t2t_vit_12", 224,
        exits_top1=[70.1, 76.2, 78.7], curve=curve, published=published,
    )  # fmt: skip
    out = tmp_path / "reports"
    build_report(study.results, [v[0] for v in VARIANTS], study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)

    with open(out / "comparison.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames or [], {r["variant"]: r for r in reader}
    # The group sits between the trained-here columns and the paper's.
    assert header.index("top1") < header.index("published_top1") < header.index("paper_top1")
    row = rows["t2t_vit_14"]
    assert float(row["published_top1"]) == 80.91
    assert float(row["published_vs_paper"]) == pytest.approx(80.91 - PAPER["t2t_vit_14"]["top1"])
    assert row["published_run_id"] == t2t
    assert rows["t2t_vit_7"]["published_top1"] == ""  # no checkpoint of that model and size

    with open(out / "published.csv", newline="") as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    assert set(table) == {"t2t_vit_14", "dvt12"}
    assert table["dvt12"]["exits_top1"] == "70.10 / 76.20 / 78.70" and table["dvt12"]["paper_top1"] == ""

    page = parse_page(out / "index.html")
    linked = {
        a["data-name"]: a.get("_links", "") for t, a in page.rows if t == "published" and "data-name" in a
    }
    assert set(linked) == {"t2t_vit_14", "dvt12"}
    assert all("/#/experiments/" in links for links in linked.values())
    comparison = {
        a["data-variant"]: a.get("_links", "")
        for t, a in page.rows
        if t == "comparison" and "data-variant" in a
    }
    assert t2t in comparison["t2t_vit_14"]
    assert (out / "dvt_published.png").stat().st_size > 1000 and (out / "dvt_published.svg").is_file()


def test_no_published_checkpoint_changes_nothing(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study")
    out = tmp_path / "reports"
    build_report(study.results, [v[0] for v in VARIANTS], study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)
    with open(out / "comparison.csv", newline="") as fh:
        assert "published_top1" not in (csv.DictReader(fh).fieldnames or [])
    assert not (out / "published.csv").exists() and not (out / "dvt_published.png").exists()
