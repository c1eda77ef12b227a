"""Shards others can read, others' shards we read: timm reads the shard stage's folder through its
``_info.json``; the loader trains on a set written with ``webdataset.ShardWriter`` (no manifest of
ours), read from a folder, through timm's ``_info.json`` with brace patterns, and from ``pipe:`` and
``http://`` URLs. Real tars, real timm, real webdataset; nothing mocked."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data import read_samples, shard_urls
from pipeline.shards import INFO


@pytest.mark.parametrize("split,ours", [("train", "train"), ("validation", "val"), ("val", "val")])
def test_timm_reads_every_sample_of_our_shards(tiny_shards: Path, split: str, ours: str) -> None:
    from timm.data import create_dataset

    dataset = create_dataset("wds/tiny", root=str(tiny_shards), split=split, is_training=False, batch_size=1)
    labels = Counter(int(target) for _, target in dataset)
    index = pq.read_table(tiny_shards / "index.parquet").to_pylist()
    assert labels == Counter(r["label"] for r in index if r["split"] == ours)
    info = json.loads((tiny_shards / INFO).read_text())
    assert info["splits"][split]["num_samples"] == sum(labels.values())


@pytest.fixture(scope="module")
def foreign(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny set rewritten by someone else: webdataset.ShardWriter, .jpg/.cls only, other keys."""
    import webdataset as wds

    out = tmp_path_factory.mktemp("foreign")
    for split, count in (("train", 48), ("val", 16)):
        samples = list(read_samples(shard_urls(tiny_shards, split)[0]))
        assert len(samples) == count
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=20, verbose=0) as sink:
            for i, s in enumerate(samples):
                sink.write({"__key__": f"sample{i:06d}", "jpg": s["jpg"], "cls": int(s["cls"])})
    return out


def test_a_shardwriter_folder_is_counted_and_trains_a_step(foreign: Path) -> None:
    from helpers import tiny_spec

    from pipeline.train.loop import LocalSession, fit

    assert shard_urls(foreign, "train") == ([str(foreign / f"train-00000{i}.tar") for i in range(3)], 48)
    assert shard_urls(foreign, "val")[1] == 16
    session = LocalSession()
    spec = tiny_spec(foreign, epochs=1, max_steps_per_epoch=1)
    metrics = fit(spec, session)
    assert [m["epoch"] for m in session.history] == [0] and metrics["val_loss"] > 0


def test_info_json_with_brace_patterns_pipe_and_http_urls(foreign: Path, tmp_path: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(foreign))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        info = {
            "name": "someone-elses",
            "splits": {
                "train": {"name": "train", "num_samples": 48, "filenames": ["train-{000000..000002}.tar"]},
                "validation": {
                    "name": "validation",
                    "num_samples": 16,
                    "filenames": [
                        f"pipe:cat {foreign}/val-000000.tar",
                        f"http://127.0.0.1:{port}/val-000000.tar",
                    ],
                },
            },
        }
        (foreign / INFO).write_text(json.dumps(info))
        urls, count = shard_urls(foreign, "train")
        assert urls == [str(foreign / f"train-00000{i}.tar") for i in range(3)] and count == 48
        val, count = shard_urls(foreign, "val")  # timm's "validation"
        assert count == 16 and val[0].startswith("pipe:") and val[1].startswith("http://")
        piped, fetched = (list(read_samples([u])) for u in val)
        assert len(piped) == 16 and [s["jpg"] for s in piped] == [s["jpg"] for s in fetched]
    finally:
        server.shutdown()
        (foreign / INFO).unlink(missing_ok=True)
