"""Every registered model trains, and the zoo command gives one row per model with the paper's numbers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from helpers import assert_trains
from timm.models import model_entrypoint

from pipeline import zoo
from pipeline.models import PAPER

#: Real widths, heads and layer types, but only two layers, so every model takes well under a second
#: on a CPU. The dense backbones derive their depth from ``block_config``: two blocks of one layer
#: each keep a transition between them.
SHALLOW: dict[str, dict] = {
    "t2t_vit_dense": {"block_config": (1, 1)},
    "vit_dense_paper": {"block_config": (1, 1)},
}


@pytest.mark.parametrize("name", zoo.registered_models())
def test_every_registered_model_trains(name: str) -> None:
    """Every model ``pipeline.models`` registers, whatever its family: its output shape, finite logits,
    a finite gradient on every trainable parameter and none on a frozen one (64 px, stochastic depth on)."""
    torch.manual_seed(0)
    kwargs = SHALLOW.get(name, {"depth": 2})
    model = timm.create_model(name, img_size=64, num_classes=10, drop_path_rate=0.1, **kwargs).train()
    assert_trains(model, exits=getattr(model, "num_exits", 1))


def test_the_sweep_covers_every_family() -> None:
    modules = {model_entrypoint(name).__module__ for name in zoo.registered_models()}
    assert {f"pipeline.models.{family}" for family in ("t2t_vit", "vit", "cnn_to_vit", "dvt")} <= modules
    assert set(SHALLOW) <= set(zoo.registered_models())


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    assert zoo.main(["--out", str(out), "--img-size", "224"]) == 0
    return out


def test_csv_has_one_row_per_registered_model(zoo_dir: Path) -> None:
    with open(zoo_dir / "zoo.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [row["model"] for row in rows]
    assert names == zoo.registered_models()
    assert len(set(names)) == len(names)
    # Every family the package registers, the "From CNN to ViT" variants included.
    assert set(timm.list_models("t2t_vit*")) | set(timm.list_models("*_paper")) <= set(names)
    for row in rows:
        assert int(row["params_all"]) >= int(row["params_trainable"]) > 0, row["model"]
        assert float(row["macs_g"]) > 0, row["model"]
        assert int(row["img_size"]) == 224


def test_rows_with_the_authors_code_deviate_by_nothing(zoo_dir: Path) -> None:
    with open(zoo_dir / "zoo.csv", newline="") as fh:
        rows = {row["model"]: row for row in csv.DictReader(fh)}
    exact = [
        key for key, entry in PAPER.items() if entry["params_all"] is not None and entry["img_size"] == 224
    ]
    for key in exact:
        assert rows[key]["ref_params_source"] == "code"
        assert float(rows[key]["params_dev_pct"]) == 0.0, key
        if PAPER[key]["macs_g_all_matmul"] is not None:
            assert abs(float(rows[key]["macs_dev_pct"])) < 0.5, key
    assert rows["vit_dn_paper"]["ref_params_source"] == "paper"


def test_every_t2t_vit_row_has_the_published_top1_and_its_source(zoo_dir: Path) -> None:
    with open(zoo_dir / "zoo.csv", newline="") as fh:
        rows = {row["model"]: row for row in csv.DictReader(fh)}
    for name in timm.list_models(module="t2t_vit"):
        assert float(rows[name]["paper_top1"]) == PAPER[name]["top1"], name
        assert rows[name]["paper_top1_source"] == PAPER[name]["top1_source"], name


def test_markdown_states_the_counting_conventions(zoo_dir: Path) -> None:
    text = (zoo_dir / "zoo.md").read_text()
    assert "all-matmul" in text and "224x224" in text
    assert "`t2t_vit_dense`" in text and "23,647,062" in text


def test_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        zoo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--img-size" in capsys.readouterr().out
