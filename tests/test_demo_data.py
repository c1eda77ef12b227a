"""The synthetic demo data set: ImageNet layout, real JPEGs, byte-identical per seed, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.demo_data import Split, class_specs, difficulty, generate_demo

TINY = {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 48, "show_progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, generate_demo(out, **TINY)


def test_layout_and_counts(tiny: tuple[Path, dict]) -> None:
    out, summary = tiny
    wnids = summary["classes"]
    assert len(wnids) == 3 and wnids == sorted(wnids)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert summary["counts"] == {"train": 12, "val": 6}
    assert summary["out_dir"] == str(out)
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == wnids
        for w in wnids:
            names = sorted(p.name for p in (out / split / w).iterdir())
            assert names == [f"{w}_{i}.JPEG" for i in range(per_class)]
    assert sorted(p.name for p in out.iterdir()) == ["LOC_synset_mapping.txt", "demo.json", "train", "val"]
    assert not out.with_name(out.name + ".tmp").exists()


def test_files_are_real_jpegs(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    files = sorted(out.rglob("*.JPEG"))
    assert len(files) == 18
    for f in files:
        with Image.open(f) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))
            img.load()


def test_synset_mapping_matches_class_folders(tiny: tuple[Path, dict]) -> None:
    out, summary = tiny
    lines = (out / "LOC_synset_mapping.txt").read_text().splitlines()
    pairs = [line.split(" ", 1) for line in lines]
    assert [w for w, _ in pairs] == sorted(p.name for p in (out / "train").iterdir()) == summary["classes"]
    assert [name for _, name in pairs] == summary["class_names"]
    assert len(set(summary["class_names"])) == 3 and all(name.strip() for name in summary["class_names"])


def test_same_args_give_byte_identical_files(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    generate_demo(tmp_path / "again", **TINY)
    assert _files(tmp_path / "again") == _files(out)


def test_different_seeds_give_different_images(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    generate_demo(tmp_path / "other", **TINY, seed=1)
    a, b = _files(out), _files(tmp_path / "other")
    assert a.keys() == b.keys()
    jpegs = [k for k in a if k.endswith(".JPEG")]
    assert all(a[k] != b[k] for k in jpegs)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_classes", 1),
        ("image_size", 31),
        ("train_per_class", 0),
        ("val_per_class", 0),
        ("seed", -1),
        ("jpeg_quality", 101),
        ("num_classes", 2.5),
    ],
)
def test_bad_argument_raises_value_error_naming_it(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        generate_demo(tmp_path / "bad", **{**TINY, name: value})
    assert not (tmp_path / "bad").exists()


def test_interrupted_run_leaves_clean_output(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "data"
    tmp = tmp_path / "data.tmp"
    (tmp / "train" / "n00000000").mkdir(parents=True)
    (tmp / "train" / "n00000000" / "junk.JPEG").write_bytes(b"half-written")
    (tmp / "junk.txt").write_text("left by an interrupted run")
    generate_demo(out, **TINY)
    assert not tmp.exists()
    assert _files(out) == _files(tiny[0])


def test_existing_output_is_replaced(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "data"
    (out / "train" / "stale").mkdir(parents=True)
    generate_demo(out, **TINY)
    assert _files(out) == _files(tiny[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_missing_parent_folders_are_created(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    generate_demo(tmp_path / "a" / "b", **TINY)
    assert _files(tmp_path / "a" / "b") == _files(tiny[0])


def test_classes_share_colour_and_shape_factors() -> None:
    specs = class_specs(10)
    assert len({(s.shape, s.family, s.texture) for s in specs}) == 10
    assert len({s.shape for s in specs}) == 5 and len({s.family for s in specs}) == 2
    for n in (2, 3, 17, 49, 100, 1000):  # up to the config's limit
        specs = class_specs(n)
        assert len({(s.shape, s.family, s.texture) for s in specs}) == n
        assert len({s.name for s in specs}) == n
        assert [s.wnid for s in specs] == sorted({s.wnid for s in specs})


def test_images_do_not_depend_on_how_many_are_generated(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    # Each image is seeded from (seed, split, class, index), so a bigger set extends a smaller one.
    generate_demo(tmp_path / "more", **{**TINY, "train_per_class": 6})
    bigger = _files(tmp_path / "more")
    assert all(bigger[k] == v for k, v in _files(tiny[0]).items() if k.endswith(".JPEG"))


def test_difficulty_is_deterministic_and_spread() -> None:
    def ds(split: Split) -> list[float]:
        return [difficulty(seed=0, split=split, class_index=c, index=i) for c in range(3) for i in range(50)]

    assert ds("val") == ds("val") != ds("train")
    assert all(0 <= d < 1 for d in ds("val")) and min(ds("val")) < 0.2 and max(ds("val")) > 0.8
