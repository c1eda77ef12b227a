"""Shared fixtures: the repository root and a miniature data set sharded once per session.

Helpers that are not fixtures live in ``helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ROOT

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
