"""Which training a checkpoint folder belongs to, and when it may be resumed or deleted.

A training's *key* names its Ray run (``<variant>-<key>``, hence its checkpoint folder) and tags
its MLflow run (``run_key``). It covers everything a checkpoint is only valid for: the resolved
recipe, the model, the data manifest, the tracking target (store URI and experiment: a run in
another store cannot be reopened, so its checkpoints are never mistaken for this one's) and the
code the run executes (the training loop, the models, the data reader), so a resume never picks
up a checkpoint written by older code.

A checkpoint folder is deleted only once a FINISHED MLflow run with its key is found; with no run
at all for a key whose checkpoints exist (the store was reset or is unreachable under that name)
nothing is deleted and the stage stops, saying where the checkpoints are. A :class:`Lease` beside
the folder (``<name>.lock``, heartbeat) makes a second trainer of the same key fail at once,
naming the first, instead of reopening or deleting its run.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pipeline.storage import Lease, Location

log = logging.getLogger(__name__)

#: The code a checkpoint depends on, relative to the ``pipeline`` package.
CODE_PATHS = ("train", "models", "data.py")


class CheckpointsKept(RuntimeError):
    """Checkpoints exist for a key the tracking store knows no run of; they are kept, not guessed at."""


def code_hash(package: Path | None = None) -> str:
    """sha256 (12 hex digits) of the ``.py`` files a training executes, by relative path and bytes."""
    package = package or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for rel in CODE_PATHS:
        target = package / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for path in files:
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run_key(phash: str, *, tracking_uri: str, experiment: str, code: str) -> str:
    """The training's key: params hash + tracking target + code hash, 12 hex digits."""
    payload = "\0".join([phash, tracking_uri, experiment, code])
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def training_lease(storage: str, name: str, ttl_s: float = 120.0) -> Lease:
    """The lease on Ray run ``name`` under ``storage`` (a folder or URI), held for the whole fit."""
    return Lease(Location(storage), f"{name}.lock", what=f"training {name}", ttl_s=ttl_s)


def has_checkpoints(storage: str, name: str) -> bool:
    loc = Location(storage)
    return loc.kind(name) == "dir" and any("checkpoint_" in p for p in loc.files(name))


def resumable_run(client: Any, experiment_id: str, key: str, storage: str, name: str) -> str | None:
    """The MLflow run to reopen for checkpoints in ``storage/name``, or None to start fresh.

    Deletes the checkpoints only when the latest run with ``run_key = key`` is FINISHED.

    Raises:
        CheckpointsKept: checkpoints exist but no run in this store has the key.
    """
    if not has_checkpoints(storage, name):
        return None
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.run_key = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise CheckpointsKept(
            f"{Location(storage).url_of(name)} holds checkpoints of this exact training, but the tracking "
            f"store has no run tagged run_key={key} to reopen (was the store reset or replaced?). "
            "Nothing was deleted. Restore the store, or move that folder away to train from scratch."
        )
    run = runs[0]
    if run.info.status == "FINISHED":
        log.info("run %s of %s finished: removing its checkpoints to train afresh", run.info.run_id, name)
        Location(storage).remove(name)
        return None
    return run.info.run_id
