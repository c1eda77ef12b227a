"""Published checkpoints in the report: a column group of comparison (with the difference to the paper),
their own table linking each row to its MLflow run, and a DVT checkpoint's curves in the DVT figure.

Real MLflow (the helpers' SQLite study), real results files as the evaluate stage writes them. What a
figure holds is read off the matplotlib figure as build_report saves it (legend label -> plotted
points, per panel) and off the written SVG (each text drawn is preceded by a comment holding it).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import DVT_VARIANT, EXPERIMENT, UI, VARIANTS, make_study, parse_page
from mlflow.tracking import MlflowClient

from pipeline.models.paper import PAPER
from pipeline.report import FIGURES, build_report


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


Panels = list[dict[str, list[tuple[float, float]]]]


def _series(ax: Any) -> dict[str, list[tuple[float, float]]]:
    """A panel's labelled lines and scatters: legend label -> plotted (x, y)."""
    out = {}
    for artist in [*ax.get_lines(), *ax.collections]:
        label = artist.get_label()
        if not label.startswith("_"):
            xy = artist.get_xydata() if hasattr(artist, "get_xydata") else artist.get_offsets()
            out[label] = [(float(x), float(y)) for x, y in xy]
    return out


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, Panels]:
    """Every figure build_report saves, by file stem: its panels' series (see :func:`_series`)."""
    from matplotlib.figure import Figure

    seen: dict[str, Panels] = {}
    save = Figure.savefig

    def savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        seen[Path(fname).stem] = [_series(ax) for ax in self.axes]
        save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def _svg_texts(path: Path) -> list[str]:
    return re.findall(r"<!-- (.*?) -->", path.read_text(), re.DOTALL)


def _points(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    return [pytest.approx((x, y)) for x, y in zip(xs, ys, strict=True)]


def test_published_checkpoints_beside_paper_and_trainings(tmp_path: Path, drawn: dict[str, Panels]) -> None:
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

    # The DVT checkpoint's curves are in the DVT figure: at 224 px, not the cascade's 64, so in a panel of
    # its own beside the cascade's; no separate figure.
    cascade, own = drawn["dvt_vs_static"]
    assert "DVT, MSDNet threshold sweep" in cascade and not any("dvt12" in label for label in cascade)
    assert own["dvt12 (published checkpoint, evaluated here)"] == _points(
        [c["avg_gmacs"] for c in curve], [c["top1"] for c in curve]
    )
    assert own["dvt12 (authors' stored curve)"] == _points(*published["budgeted_batch_classification"])
    assert own["dvt12 (authors' exits)"] == _points(published["flops"], published["anytime_classification"])
    texts = _svg_texts(out / "dvt_vs_static.svg")
    assert "dvt12 (published checkpoint, evaluated here)" in texts and "DVT, MSDNet threshold sweep" in texts
    assert "dvt12 (authors' stored curve)" in texts
    assert set(drawn) == {f.name for f in FIGURES} and not list(out.glob("dvt_published*"))
    html = (out / "index.html").read_text()
    assert 'id="figure-dvt_vs_static"' in html and "dvt_published" not in html


def test_dvt_checkpoint_joins_its_cascade_panel_and_is_drawn_without_one(
    tmp_path: Path, drawn: dict[str, Panels]
) -> None:
    study = make_study(tmp_path / "study")
    # The cascade's model at its input size, its costs within the panel's reach: on the cascade's panel.
    curve = [{"avg_gmacs": 0.03 + 0.03 * i, "top1": 60.0 + 2 * i} for i in range(5)]
    _evaluated(study.results, MlflowClient(study.uri), "dvt7", "dvt_t2t_vit_12", 64, curve=curve)
    variants = [v[0] for v in VARIANTS]
    out = tmp_path / "reports"
    build_report(study.results, variants, study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)
    (panel,) = drawn["dvt_vs_static"]
    assert "DVT, MSDNet threshold sweep" in panel and "T2T-ViT static" in panel
    points = _points([c["avg_gmacs"] for c in curve], [c["top1"] for c in curve])
    assert panel["dvt7 (published checkpoint, evaluated here)"] == points
    assert "dvt7 (published checkpoint, evaluated here)" in _svg_texts(out / "dvt_vs_static.svg")

    # No tuned cascade (its tune stage not run): the DVT figure still shows the checkpoint.
    shutil.rmtree(study.results / "dvt")
    drawn.clear()
    out = tmp_path / "untuned"
    report = build_report(study.results, variants, study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)
    assert not report.tuned
    (panel,) = drawn["dvt_vs_static"]
    assert panel == {"dvt7 (published checkpoint, evaluated here)": points}
    texts = _svg_texts(out / "dvt_vs_static.svg")
    assert "dvt7 (published checkpoint, evaluated here)" in texts
    assert any(t.startswith(f"No DVT results: {DVT_VARIANT}") for t in texts)


def test_no_published_checkpoint_changes_nothing(tmp_path: Path, drawn: dict[str, Panels]) -> None:
    study = make_study(tmp_path / "study")
    variants = [v[0] for v in VARIANTS]
    out = tmp_path / "reports"
    build_report(study.results, variants, study.uri, out, cascades=[DVT_VARIANT], ui_url=UI)
    with open(out / "comparison.csv", newline="") as fh:
        assert "published_top1" not in (csv.DictReader(fh).fieldnames or [])
    assert not (out / "published.csv").exists() and set(drawn) == {f.name for f in FIGURES}
    alone = drawn["dvt_vs_static"]

    # A checkpoint that is not a DVT one leaves the DVT figure exactly as it was.
    _evaluated(study.results, MlflowClient(study.uri), "t2t_vit_14", "t2t_vit_14", 224)
    again = tmp_path / "again"
    build_report(study.results, variants, study.uri, again, cascades=[DVT_VARIANT], ui_url=UI)
    assert (again / "published.csv").exists() and drawn["dvt_vs_static"] == alone
    assert (again / "dvt_vs_static.svg").read_bytes() == (out / "dvt_vs_static.svg").read_bytes()
    assert (again / "dvt_vs_static.png").read_bytes() == (out / "dvt_vs_static.png").read_bytes()
