"""Shared fixtures: the repository root and a miniature data set sharded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep every library single-threaded-friendly on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class demo set (12 train + 4 val images per class) sharded 10 samples per shard."""
    from pipeline.demo_data import generate_demo
    from pipeline.shards import write_shards

    base = tmp_path_factory.mktemp("tiny")
    generate_demo(
        base / "images",
        num_classes=4,
        train_per_class=12,
        val_per_class=4,
        image_size=40,
        seed=1,
        show_progress=False,
    )
    write_shards(base / "images", base / "shards", max_samples_per_shard=10, seed=0, show_progress=False)
    return base / "shards"


def copy_worktree(root: Path, dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files, as a fresh clone would have them."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = root / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
