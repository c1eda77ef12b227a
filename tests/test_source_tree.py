"""Source trees as found in the wild: a file name that is not UTF-8, a broken symlink and a symlink
out of the tree each become a named entry of the manifest's ``bad_files`` (none crashes the stage,
none is silently dropped, the outside file is never read), duplicate keys are found in one pass,
and a second shard run on an output in use refuses, naming the first. Real files, real shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from pipeline.shards import INDEX, LOCK_FILE, MANIFEST, ShardError, write_shards
from pipeline.storage import LeaseHeld

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def wild(tmp_path: Path) -> Path:
    from pipeline.demo_data import generate_demo

    source = tmp_path / "imagenet"
    generate_demo(
        source, num_classes=2, train_per_class=4, val_per_class=2, image_size=32, seed=0, show_progress=False
    )
    wnid = sorted(p.name for p in (source / "train").iterdir())[0]
    folder = source / "train" / wnid
    some_jpeg = next(folder.iterdir()).read_bytes()
    # A Latin-1 name from an old archive: not valid UTF-8.
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"), "wb") as fh:
        fh.write(some_jpeg)
    (folder / "gone.JPEG").symlink_to(tmp_path / "deleted.JPEG")
    outside = tmp_path / "elsewhere" / "secret.JPEG"
    outside.parent.mkdir()
    outside.write_bytes(some_jpeg)
    (folder / "escape.JPEG").symlink_to(outside)
    (folder / "inside.JPEG").symlink_to(next(p for p in folder.iterdir() if p.name.endswith(".JPEG")))
    return source


def test_unusable_files_are_named_in_the_manifest_and_never_read(wild: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    run = write_shards(wild, out, max_samples_per_shard=4, show_progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    bad = {Path(b["path"]).name: b["reason"] for b in manifest["bad_files"]}
    assert set(bad) == {"caf\\xe9.JPEG", "gone.JPEG", "escape.JPEG"}, manifest["bad_files"]
    assert "not valid UTF-8" in bad["caf\\xe9.JPEG"]
    assert "broken symlink" in bad["gone.JPEG"]
    assert "out of the source tree" in bad["escape.JPEG"] and "not followed" in bad["escape.JPEG"]
    # The symlink inside the tree is an ordinary image; every other image is sharded.
    members = []
    for path in sorted(out.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            members += tar.getnames()
    assert any("inside" in m for m in members)
    assert not any("escape" in m or "gone" in m or "caf" in m for m in members)
    assert manifest["splits"]["train"]["written"] == 2 * 4 + 1 == run.manifest["splits"]["train"]["found"]
    assert (out / INDEX).is_file()


def test_duplicate_keys_are_named(tmp_path: Path) -> None:
    from pipeline.demo_data import generate_demo

    source = tmp_path / "imagenet"
    generate_demo(
        source, num_classes=2, train_per_class=2, val_per_class=1, image_size=32, seed=0, show_progress=False
    )
    folder = next((source / "train").iterdir())
    first = next(folder.iterdir())
    (folder / (first.stem + ".png")).write_bytes(first.read_bytes())  # same key, another suffix
    with pytest.raises(
        ShardError, match=rf"share a name up to the suffix, e.g. \['{folder.name}/{first.stem}'\]"
    ):
        write_shards(source, tmp_path / "out", show_progress=False)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline.shards import LOCK_FILE
    from pipeline.storage import Lease, Location
    with Lease(Location(sys.argv[1]), LOCK_FILE, what=f"sharding into {sys.argv[1]}"):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_second_shard_run_on_the_same_output_refuses_naming_the_first(wild: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"sharding into {out} is in use by pid {first.pid}"):
            write_shards(wild, out, show_progress=False)
        assert not list(out.glob("*.tar")), "nothing written"
        # The stage says so in one line, exit code 1.
        proc = subprocess.run(
            [sys.executable, "-m", "stages.shard", "--source", str(wild), "--output", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1 and f"pid {first.pid}" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        first.kill()
        first.wait()
    write_shards(wild, out, show_progress=False)  # the holder is gone: the run proceeds
    assert not (out / LOCK_FILE).exists()
