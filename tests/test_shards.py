"""Sharding: exact bytes, odd and bad files accounted for, byte-identical output whatever the worker
count, resumption that rewrites only what is missing, fsspec outputs, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import pipeline.shards as shards_module
from pipeline.demo_data import generate_demo
from pipeline.imagenet import scan
from pipeline.shards import MANIFEST, PARTIAL, ShardError, plan_shards, read_manifest, write_shards


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("img") / "images"
    generate_demo(
        out, num_classes=3, train_per_class=7, val_per_class=3, image_size=40, seed=3, show_progress=False
    )
    return out


def _write(source: Path, output, **kw):
    kw.setdefault("workers", 1)
    return write_shards(source, output, show_progress=False, **kw)


def _samples(folder: Path, split: str) -> list[dict]:
    """The split's samples as webdataset reads them, each with its index row under ``"meta"``."""
    manifest = read_manifest(folder)
    urls = [str(folder / s["name"]) for s in manifest["splits"][split]["shards"]]
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    rows = {r["key"]: r for r in pq.read_table(folder / "index.parquet").to_pylist() if r["split"] == split}
    assert len(rows) == len(samples)
    for s in samples:
        assert sorted(k for k in s if not k.startswith("__")) == ["cls", "jpg"]  # timm's two members
        s["meta"] = rows[s["__key__"]]
    return samples


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_manifest_counts_and_index(images: Path, tmp_path: Path) -> None:
    manifest = _write(images, tmp_path / "s", max_samples_per_shard=5).manifest
    # A finished folder: the shards, the index, timm's _info.json, the manifest and nothing else.
    others = {p.name for p in (tmp_path / "s").iterdir() if not p.name.endswith(".tar")}
    assert others == {MANIFEST, "index.parquet", "_info.json", ".gitignore"}, others
    assert manifest["classes"] == sorted(p.name for p in (images / "train").iterdir())
    train = manifest["splits"]["train"]
    assert train["count"] == train["found"] == train["written"] == 21 and train["skipped"] == []
    assert sum(train["per_class"].values()) == 21
    assert [s["samples"] for s in train["shards"]] == [5, 5, 5, 5, 1]
    for s in train["shards"]:
        path = tmp_path / "s" / s["name"]
        assert s["bytes"] == path.stat().st_size
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    index_bytes = (tmp_path / "s" / "index.parquet").read_bytes()
    assert manifest["index"]["sha256"] == hashlib.sha256(index_bytes).hexdigest()
    index = pq.read_table(tmp_path / "s" / "index.parquet").to_pylist()
    assert len(index) == 21 + 9
    assert {r["split"] for r in index} == {"train", "val"}
    assert {r["converted_from"] for r in index} == {None}


def test_jpeg_bytes_copied_verbatim_with_label_and_wnid(images: Path, tmp_path: Path) -> None:
    _write(images, tmp_path / "s", max_samples_per_shard=4)
    samples = _samples(tmp_path / "s", "val")
    assert len(samples) == 9
    wnids = read_manifest(tmp_path / "s")["classes"]
    for s in samples:
        meta = s["meta"]
        assert s["jpg"] == (images / meta["path"]).read_bytes()
        assert int(s["cls"]) == meta["label"] == wnids.index(meta["wnid"])
        assert meta["converted_from"] is None


def test_same_input_and_seed_give_identical_output_whatever_the_worker_count(
    images: Path, tmp_path: Path
) -> None:
    a = _write(images, tmp_path / "a", max_samples_per_shard=4, seed=5, workers=1)
    b = _write(images, tmp_path / "b", max_samples_per_shard=4, seed=5, workers=2)
    c = _write(images, tmp_path / "c", max_samples_per_shard=4, seed=6, workers=1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # shards, index, manifest, progress record
    digests = [[s["sha256"] for s in r.manifest["splits"]["train"]["shards"]] for r in (a, b, c)]
    assert digests[0] == digests[1] != digests[2]


def test_shards_mix_classes(images: Path, tmp_path: Path) -> None:
    _write(images, tmp_path / "s", max_samples_per_shard=7)
    first = _samples(tmp_path / "s", "train")[:7]
    assert len({s["meta"]["wnid"] for s in first}) > 1


def test_byte_limit_plans_boundaries_from_file_sizes(images: Path, tmp_path: Path) -> None:
    listing = scan(images)
    limit = 24 * 1024
    plan = plan_shards(listing.samples, seed=0, max_samples_per_shard=100, max_bytes_per_shard=limit)
    assert plan == plan_shards(listing.samples, seed=0, max_samples_per_shard=100, max_bytes_per_shard=limit)
    manifest = _write(images, tmp_path / "s", max_samples_per_shard=100, max_bytes_per_shard=limit).manifest
    train = manifest["splits"]["train"]["shards"]
    assert len(train) > 1 and all(s["bytes"] <= limit for s in train)
    assert [s["samples"] for s in train] == [len(p.samples) for p in plan if p.split == "train"]


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no-such-dir"):
        _write(tmp_path / "no-such-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def odd_source(images: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The demo set with a PNG, a CMYK and a grayscale JPEG under .JPEG names, and a non-image."""
    src = tmp_path / "odd"
    shutil.copytree(images, src)
    victims = sorted((src / "train").rglob("*.JPEG"))[:3]
    kinds = {}
    for path, (mode, fmt, kind) in zip(
        victims, [("RGB", "PNG", "png"), ("CMYK", "JPEG", "cmyk"), ("L", "JPEG", "gray")], strict=True
    ):
        Image.open(path).convert(mode).save(path, format=fmt)
        kinds[path.relative_to(src).as_posix()] = kind
    return src, kinds


def test_png_cmyk_and_gray_reach_the_shards_as_rgb_jpegs(odd_source, tmp_path: Path) -> None:
    src, kinds = odd_source
    manifest = _write(src, tmp_path / "s").manifest
    assert manifest["splits"]["train"]["converted"] == {"cmyk": 1, "gray": 1, "png": 1}
    seen = {}
    for s in _samples(tmp_path / "s", "train"):
        meta = s["meta"]
        with Image.open(io.BytesIO(s["jpg"])) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
            if meta["path"] in kinds:
                seen[meta["path"]] = meta["converted_from"]
                expected = np.asarray(Image.open(src / meta["path"]).convert("RGB"), dtype=np.float32)
                assert np.abs(np.asarray(img, dtype=np.float32) - expected).mean() < 3
            else:
                assert s["jpg"] == (src / meta["path"]).read_bytes()
    assert seen == kinds
    index = pq.read_table(tmp_path / "s" / "index.parquet").to_pylist()
    assert {r["path"]: r["converted_from"] for r in index if r["converted_from"]} == kinds


def _break(src: Path) -> list[str]:
    """Make an empty, a truncated and a non-image file (in two splits); return their relative paths."""
    train = sorted((src / "train").rglob("*.JPEG"))
    val = sorted((src / "val").rglob("*.JPEG"))
    train[0].write_bytes(b"")
    train[5].write_bytes(train[5].read_bytes()[:300])
    val[1].write_bytes(b"<html>not found</html>")
    return sorted(p.relative_to(src).as_posix() for p in (train[0], train[5], val[1]))


def test_bad_images_fail_naming_every_one_and_no_manifest(images: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(images, src)
    bad = _break(src)
    with pytest.raises(ShardError) as err:
        _write(src, tmp_path / "out", on_bad_image="fail")
    for rel in bad:
        assert str(src / rel) in str(err.value)
    assert "empty file" in str(err.value) and "truncated" in str(err.value)
    assert not (tmp_path / "out" / MANIFEST).exists()
    partial = json.loads((tmp_path / "out" / PARTIAL).read_text())
    assert [b["path"] for b in partial["bad"]] == bad


def test_skip_lists_bad_images_and_counts_add_up(images: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(images, src)
    bad = _break(src)
    with pytest.raises(ShardError):
        _write(src, tmp_path / "out", max_samples_per_shard=4, on_bad_image="fail")
    run = _write(src, tmp_path / "out", max_samples_per_shard=4, on_bad_image="skip")
    manifest = run.manifest
    skipped = [b["path"] for split in ("train", "val") for b in manifest["splits"][split]["skipped"]]
    assert sorted(skipped) == bad
    for split, found in (("train", 21), ("val", 9)):
        entry = manifest["splits"][split]
        assert entry["found"] == found == entry["written"] + len(entry["skipped"])
        assert (
            sum(entry["per_class"].values()) == sum(s["samples"] for s in entry["shards"]) == entry["written"]
        )
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert len(index) == 30 - 3 and not {r["path"] for r in index} & set(bad)
    # The shards without a bad file were complete after the failed run and are kept.
    assert run.reused and len(run.written) <= 3
    assert sorted(run.reused + run.written) == sorted(
        s["name"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]
    )


def test_non_images_are_ignored_and_listed(images: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(images, src)
    wnid = next((src / "train").iterdir()).name
    (src / "train" / wnid / "notes.txt").write_text("not an image")
    (src / "val" / ".DS_Store").write_bytes(b"\0")
    manifest = _write(src, tmp_path / "out").manifest
    assert manifest["ignored"] == [f"train/{wnid}/notes.txt", "val/.DS_Store"]
    assert manifest["splits"]["train"]["found"] == 21


def test_resume_rewrites_only_the_missing_and_damaged_shards(images: Path, tmp_path: Path) -> None:
    reference = _write(images, tmp_path / "ref", max_samples_per_shard=4)
    out = tmp_path / "out"
    first = _write(images, out, max_samples_per_shard=4)
    assert len(first.written) == 9 and first.reused == []
    (out / "train-000002.tar").unlink()
    damaged = bytearray((out / "val-000001.tar").read_bytes())
    damaged[1000] ^= 0xFF
    (out / "val-000001.tar").write_bytes(bytes(damaged))
    # A finished folder keeps no progress record: its manifest and index stand in for it.
    again = _write(images, out, max_samples_per_shard=4, workers=2)
    assert again.written == ["train-000002.tar", "val-000001.tar"]
    assert len(again.reused) == 7 and again.images == 4 + 4
    assert _files(out) == _files(tmp_path / "ref")
    assert again.manifest == reference.manifest
    # A source image modified after the manifest was written: its shard is written again.
    changed = sorted((images / "train").rglob("*.JPEG"))[0]
    os.utime(changed, ns=(time.time_ns() + 10**9,) * 2)
    third = _write(images, out, max_samples_per_shard=4)
    assert len(third.written) == 1 and len(third.reused) == 8


def test_interrupted_run_keeps_complete_shards_and_writes_no_manifest(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real, calls = shards_module._write_shard, []

    def dies_after_three(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(task.name)
        return real(task)

    monkeypatch.setattr(shards_module, "_write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _write(images, out, max_samples_per_shard=4)
    monkeypatch.undo()
    assert not (out / MANIFEST).exists()
    assert sorted(json.loads((out / PARTIAL).read_text())["shards"]) == sorted(calls)
    resumed = _write(images, out, max_samples_per_shard=4)
    assert sorted(resumed.reused) == sorted(calls) and len(resumed.written) == 9 - 3
    assert not (out / PARTIAL).exists()  # the progress record is gone once the manifest is written
    _write(images, tmp_path / "ref", max_samples_per_shard=4)
    assert _files(out) == _files(tmp_path / "ref")


def test_changed_plan_starts_over_and_removes_stale_shards(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(images, out, max_samples_per_shard=3)
    (out / "notes.md").write_text("not ours: kept")
    run = _write(images, out, max_samples_per_shard=7)
    assert run.reused == [] and len(run.written) == 3 + 2
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert (out / "notes.md").exists() and not list(out.glob("*.tmp"))


def test_output_through_fsspec_uris(images: Path, tmp_path: Path) -> None:
    from pipeline.data import read_samples, shard_urls

    local = _write(images, tmp_path / "local", max_samples_per_shard=4)
    via_file = _write(images, f"file://{tmp_path / 'via-file'}", max_samples_per_shard=4, workers=2)
    assert via_file.manifest["splits"] == local.manifest["splits"]
    assert _files(tmp_path / "via-file") == _files(tmp_path / "local")

    in_memory = _write(images, "memory://test-shards/out", max_samples_per_shard=4)  # one process
    assert in_memory.manifest["splits"] == local.manifest["splits"]
    assert read_manifest("memory://test-shards/out") == in_memory.manifest
    urls, count = shard_urls("memory://test-shards/out", "val")
    assert all(u.startswith("memory://") for u in urls)
    assert len(list(read_samples(urls))) == count == 9


@pytest.mark.parametrize("workers", [1, 2])
def test_standalone_cli_needs_no_params(images: Path, tmp_path: Path, workers: int) -> None:
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
            "--workers",
            str(workers),
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
    assert "img/s" in proc.stderr  # the progress bar
    if workers > 1 and sys.platform == "linux":
        # The CLI's process is single-threaded when it starts its workers: they are forked (fast),
        # not started by a fork server (about a second, and every import again).
        assert "2 worker processes (start method: fork)" in proc.stderr


def test_index_bytes_match(images: Path, tmp_path: Path) -> None:
    _write(images, tmp_path / "s")
    for row in pq.read_table(tmp_path / "s" / "index.parquet").to_pylist():
        assert row["bytes"] == (images / row["path"]).stat().st_size


def test_shards_are_plain_tars_with_fixed_metadata(images: Path, tmp_path: Path) -> None:
    manifest = _write(images, tmp_path / "s", max_samples_per_shard=4).manifest
    for entry in manifest["splits"]["val"]["shards"]:
        with tarfile.open(tmp_path / "s" / entry["name"]) as tar:
            members = tar.getmembers()
        assert len(members) == 2 * entry["samples"]
        assert [m.name.rsplit(".", 1)[1] for m in members] == ["cls", "jpg"] * entry["samples"]
        assert {(m.mtime, m.mode, m.uname, m.gname, m.isreg()) for m in members} == {(0, 0o444, "", "", True)}


@pytest.mark.parametrize("key", ["n01440764/n01440764_10026", "x" * 40 + "/" + "y" * 90, "n01/caf\u00e9"])
def test_members_are_the_ustar_bytes_tarfile_writes(key: str) -> None:
    sample = {"__key__": key, "cls": b"7", "jpg": bytes(range(256)) * 3}
    ours = io.BytesIO()
    with shards_module.tar_writer(ours) as tar:
        tar.write(sample)
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.USTAR_FORMAT) as out:
        for suffix in ("cls", "jpg"):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[suffix]), 0, 0o444, "", ""
            out.addfile(info, io.BytesIO(sample[suffix]))
    assert ours.getvalue() == expected.getvalue()


def test_index_columns_read_back_as_written() -> None:
    import pyarrow as pa

    columns = {
        "split": ["train", "val"],
        "shard": ["train-000000.tar", "val-000000.tar"],
        "key": ["n01/a", "n02/caf\u00e9"],
        "label": [0, 999],
        "wnid": ["n01", "n02"],
        "path": ["train/n01/a.JPEG", "val/n02/caf\u00e9.JPEG"],
        "bytes": [1, 2**40],
        "converted_from": [None, "cmyk"],
    }
    table = pq.read_table(io.BytesIO(shards_module.index_parquet(columns)))
    assert table.schema.types == [getattr(pa, kind)() for kind in shards_module.INDEX_COLUMNS.values()]
    assert table.to_pydict() == columns


def test_verify_mode_is_part_of_the_plan(images: Path, tmp_path: Path) -> None:
    first = _write(images, tmp_path / "out", max_samples_per_shard=4)
    assert first.manifest["verify"] == "markers"
    again = _write(images, tmp_path / "out", max_samples_per_shard=4)
    assert again.written == [] and len(again.reused) == len(first.written)
    decode = _write(images, tmp_path / "out", max_samples_per_shard=4, verify="decode")
    assert decode.reused == [] and decode.manifest["verify"] == "decode"
    # Either check keeps every RGB JPEG byte for byte: the shards are the same.
    assert [s["sha256"] for s in decode.manifest["splits"]["train"]["shards"]] == [
        s["sha256"] for s in first.manifest["splits"]["train"]["shards"]
    ]
    with pytest.raises(ShardError, match="verify must be one of"):
        _write(images, tmp_path / "out", verify="eyeball")


def test_a_folder_of_an_older_readable_version_is_read_and_an_unknown_one_refused(
    images: Path, tmp_path: Path
) -> None:
    from pipeline.data import read_samples, shard_urls

    out = tmp_path / "s"
    _write(images, out, max_samples_per_shard=8)
    manifest = json.loads((out / MANIFEST).read_text())
    # Version 2 folders have a third member per sample (.json); today's reader passes it through.
    manifest["version"] = 2
    (out / MANIFEST).write_text(json.dumps(manifest))
    urls, count = shard_urls(out, "val")
    assert sum(1 for _ in read_samples(urls)) == count
    manifest["version"] = 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"manifest version 1, this code reads 2, 3; re-shard"):
        read_manifest(out)
