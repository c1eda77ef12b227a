"""Sharding an ImageNet-layout folder: exact bytes, deterministic tars, manifest, index, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.demo_data import generate_demo
from pipeline.shards import ShardError, read_manifest, write_shards


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("img") / "images"
    generate_demo(
        out, num_classes=3, train_per_class=7, val_per_class=3, image_size=40, seed=3, show_progress=False
    )
    return out


def _samples(folder: Path, split: str) -> list[dict]:
    manifest = read_manifest(folder)
    urls = [str(folder / s["name"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def test_manifest_counts_and_index(images: Path, tmp_path: Path) -> None:
    manifest = write_shards(images, tmp_path / "s", max_samples_per_shard=5, show_progress=False)
    assert manifest["classes"] == sorted(p.name for p in (images / "train").iterdir())
    train = manifest["splits"]["train"]
    assert train["count"] == 21 and sum(train["per_class"].values()) == 21
    assert [s["samples"] for s in train["shards"]] == [5, 5, 5, 5, 1]
    for s in train["shards"]:
        path = tmp_path / "s" / s["name"]
        assert s["bytes"] == path.stat().st_size
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    index = pq.read_table(tmp_path / "s" / "index.parquet").to_pylist()
    assert len(index) == 21 + 9
    assert {r["split"] for r in index} == {"train", "val"}


def test_jpeg_bytes_copied_verbatim_with_label_and_wnid(images: Path, tmp_path: Path) -> None:
    write_shards(images, tmp_path / "s", max_samples_per_shard=4, show_progress=False)
    samples = _samples(tmp_path / "s", "val")
    assert len(samples) == 9
    wnids = read_manifest(tmp_path / "s")["classes"]
    for s in samples:
        meta = json.loads(s["json"])
        assert s["jpg"] == (images / meta["path"]).read_bytes()
        assert int(s["cls"]) == meta["label"] == wnids.index(meta["wnid"])


def test_same_input_and_seed_give_identical_shards(images: Path, tmp_path: Path) -> None:
    a = write_shards(images, tmp_path / "a", max_samples_per_shard=4, seed=5, show_progress=False)
    b = write_shards(images, tmp_path / "b", max_samples_per_shard=4, seed=5, show_progress=False)
    c = write_shards(images, tmp_path / "c", max_samples_per_shard=4, seed=6, show_progress=False)
    digests = [[s["sha256"] for s in m["splits"]["train"]["shards"]] for m in (a, b, c)]
    assert digests[0] == digests[1] != digests[2]


def test_shards_mix_classes(images: Path, tmp_path: Path) -> None:
    write_shards(images, tmp_path / "s", max_samples_per_shard=7, show_progress=False)
    first = _samples(tmp_path / "s", "train")[:7]
    assert len({json.loads(s["json"])["wnid"] for s in first}) > 1


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no-such-dir"):
        write_shards(tmp_path / "no-such-dir", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_jpeg_is_named_and_nothing_is_left(images: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(images, src)
    victim = next((src / "train").rglob("*.JPEG"))
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(ShardError, match=victim.name):
        write_shards(src, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_non_images_are_ignored_and_listed(images: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(images, src)
    wnid = next((src / "train").iterdir()).name
    (src / "train" / wnid / "notes.txt").write_text("not an image")
    manifest = write_shards(src, tmp_path / "out", show_progress=False)
    assert manifest["ignored"] == [f"train/{wnid}/notes.txt"]


def test_standalone_cli_needs_no_params(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.shard",
            "--source",
            str(images),
            "--output",
            str(out),
            "--params",
            str(tmp_path / "absent.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(out)["splits"]["val"]["count"] == 9


def test_index_bytes_match(images: Path, tmp_path: Path) -> None:
    write_shards(images, tmp_path / "s", show_progress=False)
    for row in pq.read_table(tmp_path / "s" / "index.parquet").to_pylist():
        assert row["bytes"] == (images / row["path"]).stat().st_size
