"""Resumption of the shard stage (:mod:`pipeline.shards`): which shards of an output folder a new
run with the same plan can keep.

* An interrupted or failed run left ``manifest.partial.json``, the progress record rewritten after
  every shard: its shards are kept when their sha256 still matches.
* A finished folder holds no progress record; its ``manifest.json`` and ``index.parquet`` hold every
  field of one, rebuilt shard by shard (same settings, same samples with the same sizes, no source
  file modified after the manifest was written).

Whatever does not belong to the record (temporaries, unplanned or unrecorded shards, an old
manifest and index) is removed; a changed plan starts over.
"""

from __future__ import annotations

import io
import json
import logging
from typing import TYPE_CHECKING, Any

from pipeline.processes import run_in_processes
from pipeline.shard_folder import INDEX, MANIFEST, MANIFEST_VERSION, OWN_FILES, PARTIAL, Store, shard_sha256

if TYPE_CHECKING:
    from pipeline.shards import ShardPlan

log = logging.getLogger(__name__)

__all__ = ["finished_record", "resume"]


def finished_record(store: Store, plans: list[ShardPlan], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The progress record of a finished folder, rebuilt from its ``manifest.json`` and
    ``index.parquet`` (which hold every field of it), keeping only the shards that still match the
    plan: the same settings, the same samples with the same sizes, none modified after the manifest
    was written. None when there is no readable pair."""
    if not store.exists(MANIFEST):
        return None
    import pyarrow.parquet as pq  # (its thread pool then makes the workers start from a fork server)

    try:
        manifest = json.loads(store.read(MANIFEST))
        index = pq.read_table(
            io.BytesIO(store.read(INDEX)), columns=["shard", "key", "bytes", "converted_from"]
        )
        written_ns = int(store.fs.modified(store.path(MANIFEST)).timestamp() * 1e9)
    except (FileNotFoundError, ValueError, OSError, NotImplementedError) as e:  # pyarrow: OSError/ValueError
        log.warning("%s or its index is unreadable (%s): every shard is written again", store.url, e)
        return None
    if manifest.get("version") != MANIFEST_VERSION or any(manifest.get(k) != v for k, v in settings.items()):
        return None
    stored: dict[str, dict[str, tuple[int, str | None]]] = {}
    for row in index.to_pylist():
        stored.setdefault(row["shard"], {})[row["key"]] = (row["bytes"], row["converted_from"])
    skipped = {b["path"]: b for split in manifest["splits"].values() for b in split["skipped"]}
    listed = {shard["name"]: shard for split in manifest["splits"].values() for shard in split["shards"]}
    records: dict[str, dict[str, Any]] = {}
    for plan in plans:
        rows, record = stored.get(plan.name, {}), listed.get(plan.name)
        kept = [s for s in plan.samples if s.rel not in skipped]
        if (
            record is None
            or set(rows) != {s.key for s in kept}
            or any(rows[s.key][1] is None and rows[s.key][0] != s.size for s in kept)
            or max(s.mtime_ns for s in plan.samples) >= written_ns
        ):
            continue  # written again
        converted = [[s.key, rows[s.key][1], rows[s.key][0]] for s in kept if rows[s.key][1]]
        gone = [skipped[s.rel] for s in plan.samples if s.rel in skipped]
        fields = {k: record[k] for k in ("samples", "bytes", "sha256")}
        records[plan.name] = {**fields, "converted": converted, "skipped": gone}
    return {"version": MANIFEST_VERSION, "shards": records, "bad": []}


def resume(
    store: Store, plan_id: str, plans: list[ShardPlan], workers: int, finished: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The progress record to continue from (the partial one, else ``finished``: that of a folder
    whose run completed); removes whatever does not belong to it."""
    partial = None if finished is None else {**finished, "plan": plan_id}  # checked shard by shard
    if store.exists(PARTIAL):
        try:
            partial = json.loads(store.read(PARTIAL))
        except ValueError:
            log.warning("%s is unreadable: starting over", store.path(PARTIAL))
    own = [n for n in store.names() if OWN_FILES.match(n)]
    if not partial or partial.get("plan") != plan_id:
        if own:
            log.info(
                "no progress record for this plan: removing %d earlier file(s) from %s", len(own), store.url
            )
        for name in own:
            store.remove(name)
        return {"version": MANIFEST_VERSION, "plan": plan_id, "shards": {}, "bad": []}
    planned = {p.name for p in plans}
    records = {n: r for n, r in partial["shards"].items() if n in planned}
    for name in own:
        if name not in records and name != PARTIAL:
            store.remove(name)  # temporaries, unplanned or unrecorded shards, an old manifest and index
    checked = dict(run_in_processes(shard_sha256, [(store.url, n) for n in sorted(records)], workers)[0])
    for name in sorted(records):
        if checked[name] != records[name]["sha256"]:
            log.warning("%s is missing or does not match its recorded sha256: rewriting it", store.path(name))
            store.remove(name)
            del records[name]
    return {**partial, "shards": records, "bad": []}
