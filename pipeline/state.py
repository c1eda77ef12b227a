"""The study's state between cluster jobs: ``dvc.lock``, ``params.yaml``, the in-repository outputs
``dvc.lock`` lists and their DVC cache objects, kept in one location (``--output``: a shared folder
or an object-store URI, through :mod:`pipeline.storage`).

Saving never leaves a half-written state behind:

1. the DVC cache objects are added (content-addressed: a present name is the same bytes);
2. every other file is staged under ``.staging/<id>/``; the live state is untouched so far;
3. ``swap.json`` records the staged paths and the new ``dvc.lock``;
4. each staged path replaces its live one, and ``dvc.lock`` is written last;
5. ``swap.json`` and the staging folder are removed.

A save stopped during 4 (``ray job stop``, a lost node) is rolled forward by the next save or
restore, which finds ``swap.json``; one stopped earlier left the previous state as it was. Only
one job owns a location at a time: :func:`job_lease` (``job.lock``, a heartbeat lease).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline.storage import Lease, Location, copy, is_uri

log = logging.getLogger(__name__)

LOCK = "dvc.lock"
PARAMS = "params.yaml"
JOB_RECORD = "job.json"
JOB_LOCK = "job.lock"
SWAP = "swap.json"
STAGING = ".staging"
#: The DVC cache objects of the in-repo outputs, so a restored output is "in cache" for DVC.
CACHE = "dvc-cache"


class StateError(RuntimeError):
    """The location holds no usable state, or it belongs to other params; the message says which."""


def state_paths(lock_text: str) -> list[str]:
    """``dvc.lock``'s outputs that live inside the repository (metrics and plots included).

    Outputs at absolute paths or URIs (ImageNet shards on shared storage) already are where
    every node and the next job see them, so they are not copied.
    """
    lock = yaml.safe_load(lock_text) or {}
    paths: list[str] = []
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path = str(out["path"])
            if is_uri(path) or Path(path).is_absolute() or ".." in Path(path).parts:
                continue
            if path not in paths:
                paths.append(path)
    return paths


def job_lease(output: str, **info: Any) -> Lease:
    """The lease a job holds on ``output`` while it restores, runs and saves."""
    return Lease(Location(output), JOB_LOCK, what=f"the study state in {output}", ttl_s=180.0, **info)


def _finish_swap(out: Location) -> None:
    """Roll an interrupted save forward (idempotent: every step may be repeated)."""
    if not out.exists(SWAP):
        return
    swap = json.loads(out.read_text(SWAP))
    log.warning("finishing the state save %s that was interrupted in %s", swap["stage"], out.url)
    for rel in swap["paths"]:
        if out.exists(f"{swap['stage']}/{rel}"):
            out.move(f"{swap['stage']}/{rel}", rel)
        elif rel in swap.get("removed", []):
            out.remove(rel)
    out.write_bytes(LOCK, swap["lock"])
    out.remove(swap["stage"])
    out.remove(SWAP)


def save_state(root: Path, output: str) -> list[str]:
    """Save ``root``'s ``dvc.lock``, ``params.yaml`` and in-repo outputs to ``output``, stage then
    swap, ``dvc.lock`` last. Returns the paths saved."""
    local, out = Location(root), Location(output)
    out.makedirs()
    _finish_swap(out)
    lock_path = root / LOCK
    if not lock_path.is_file():  # nothing ran to completion: keep what is there, add the params
        out.write_bytes(PARAMS, (root / PARAMS).read_bytes())
        return [PARAMS]
    lock_text = lock_path.read_text()
    paths = [PARAMS, *state_paths(lock_text)]
    copy(local, ".dvc/cache", out, CACHE, only_missing=True)
    stage = f"{STAGING}/{uuid.uuid4().hex[:12]}"
    removed = []
    for rel in paths:
        if not copy(local, rel, out, f"{stage}/{rel}"):
            removed.append(rel)  # listed in dvc.lock but absent (a failed stage): not restored next time
    out.write_bytes(SWAP, json.dumps({"stage": stage, "paths": paths, "removed": removed, "lock": lock_text}))
    _finish_swap(out)
    return [LOCK, *[p for p in paths if p not in removed]]


def restore_state(output: str, root: Path) -> list[str]:
    """Copy the last saved ``dvc.lock`` and its outputs from ``output`` into ``root``."""
    out, local = Location(output), Location(root)
    if out.kind() != "dir":
        return []
    _finish_swap(out)
    if not out.exists(LOCK):
        return []
    restored = [LOCK, *state_paths(out.read_text(LOCK))]
    for rel in restored:
        local.remove(rel)
        copy(out, rel, local, rel)
    copy(out, CACHE, local, ".dvc/cache", only_missing=True)
    return restored


def fetch_state(output: str, root: Path, cache_dir: Path) -> list[str]:
    """Copy the last job's ``dvc.lock``, in-repo outputs and their DVC cache objects into ``root``.

    Raises:
        StateError: the location holds no finished job's state, or ``root``'s params.yaml no
            longer holds the values the job ran with (that dvc.lock would describe another study).
    """
    out, local = Location(output), Location(root)
    if out.kind() == "dir":
        _finish_swap(out)
    if not out.exists(LOCK):
        raise StateError(f"{output} holds no study state (no {LOCK}): nothing to fetch")
    record = read_record(output) or {}
    log.info("fetching the state job %s left in %s", record.get("submission_id", "?"), output)
    ran_with = yaml.safe_load(out.read_text(PARAMS)) if out.exists(PARAMS) else None
    if ran_with != yaml.safe_load((root / PARAMS).read_text()):
        raise StateError(
            f"{root / PARAMS} differs from the params the job ran with ({output}/{PARAMS}); "
            "not overwriting dvc.lock. Restore those params, or copy the outputs by hand."
        )
    paths = [LOCK, *state_paths(out.read_text(LOCK))]
    fetched = []
    for rel in paths:
        if out.exists(rel):
            local.remove(rel)
            copy(out, rel, local, rel)
            fetched.append(rel)
    copy(out, CACHE, Location(cache_dir), "", only_missing=True)
    return fetched


def write_record(output: str, record: dict[str, Any]) -> None:
    out = Location(output)
    out.makedirs()
    out.write_bytes(JOB_RECORD, json.dumps(record, indent=2) + "\n")


def read_record(output: str) -> dict[str, Any] | None:
    out = Location(output)
    return json.loads(out.read_text(JOB_RECORD)) if out.exists(JOB_RECORD) else None
