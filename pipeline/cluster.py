"""The study as a Ray job: ``dvc repro`` on the cluster, its state kept on shared storage.

``python -m pipeline.submit`` (the client) uploads the working tree and runs this module as the
job's entrypoint: ``python -m pipeline.cluster --output URI [TARGET ...]``. The job

1. copies the uploaded tree into a private folder (Ray reuses one unpacked copy for every job with
   the same upload, so two submissions of the same tree would otherwise share a folder);
2. checks params.yaml (and that checkpoints go to shared storage), then restores the study's
   state from ``--output``: the ``dvc.lock`` of the last job, the outputs it lists and their DVC
   cache objects, so DVC re-runs only what changed since (nothing, on a resubmission);
3. runs ``dvc repro`` with ``core.no_scm`` (the upload has no ``.git``): the same DAG, skipping
   rules and lock file as on a laptop;
4. saves ``dvc.lock``, ``params.yaml``, every output inside the repository and the DVC cache
   back to ``--output`` (also when a stage fails, so the next job resumes from the stages that
   finished), plus ``job.json``;
5. tags the MLflow runs it made with the submitter's git commit (the job's copy has no git).

``--output`` is a folder every node sees (NFS, a PVC) or an object-store URI (``s3://``, ``gs://``),
opened with ``pyarrow.fs``, the library Ray uses for its own storage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, StudyConfig, load_config

# Named explicitly: run as ``python -m pipeline.cluster`` the module is ``__main__``.
log = logging.getLogger("pipeline.cluster")

LOCK = "dvc.lock"
PARAMS = "params.yaml"
JOB_RECORD = "job.json"
#: The DVC cache objects of the in-repo outputs, so a restored output is "in cache" for DVC.
CACHE = "dvc-cache"
#: Environment the client sets for the job: the submitter's commit (the upload has no .git).
ENV_COMMIT, ENV_DIRTY, ENV_SUBMISSION = "STUDY_GIT_COMMIT", "STUDY_GIT_DIRTY", "STUDY_SUBMISSION_ID"
#: Never copied into the job's private folder: outputs and state of an earlier job in the same
#: (reused) unpacked upload, and DVC's per-checkout folders.
_PRIVATE_SKIP = {"data", "results", "reports", "runs", "mlflow.db", "mlartifacts", "__pycache__"}
_DVC_SKIP = {"cache", "tmp", "config.local"}


class StorageError(RuntimeError):
    """The shared output location cannot be read or written."""


class StudyError(RuntimeError):
    """The study cannot run on a cluster as configured; the message says what to change."""


def _shared(path: str) -> bool:
    return "://" in path or Path(path).is_absolute()


def check_study(cfg: StudyConfig) -> list[str]:
    """Refuse params whose checkpoints would die with the job; return warnings for the rest.

    Raises:
        StudyError: a variant's ``train.storage_path`` is relative (it would resolve inside the
            job's temporary copy: checkpoints lost, multi-node training broken).
    """
    relative = sorted({cfg.train_for(v).storage_path for v in cfg.variants})
    relative = [p for p in relative if not _shared(p)]
    if relative:
        raise StudyError(
            f"train.storage_path {relative[0]!r} is relative: on a cluster it resolves inside the job's "
            "temporary copy, so checkpoints are lost and workers on other nodes cannot write them. "
            "Set train.storage_path in params.yaml to storage every node sees "
            "(s3://bucket/t2t-runs, or a mount such as /mnt/shared/runs)."
        )
    warnings = []
    if not _shared(cfg.data.shards.output):
        warnings.append(
            f"data.shards.output {cfg.data.shards.output!r} is inside the job's copy: fine on a one-node "
            "cluster, unreadable by workers on other nodes (use shared storage for a multi-node run)"
        )
    return warnings


# --- shared storage -------------------------------------------------------------------------------


def open_location(uri: str) -> tuple[Any, str]:
    """A ``pyarrow.fs`` filesystem and the path inside it for a folder or an object-store URI."""
    from pyarrow import fs

    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... by scheme
        raise StorageError(f"cannot open the output location {uri!r}: {err}") from None


def path_kind(filesystem: Any, path: str) -> str:
    from pyarrow import fs

    info = filesystem.get_file_info(path)
    return {fs.FileType.File: "file", fs.FileType.Directory: "dir"}.get(info.type, "missing")


def _remove(filesystem: Any, path: str) -> None:
    kind = path_kind(filesystem, path)
    if kind == "dir":
        filesystem.delete_dir(path)
    elif kind == "file":
        filesystem.delete_file(path)


def copy_path(src_fs: Any, src: str, dst_fs: Any, dst: str) -> bool:
    """Replace ``dst`` by a copy of file or folder ``src``; False if ``src`` does not exist."""
    from pyarrow import fs

    kind = path_kind(src_fs, src)
    if kind == "missing":
        return False
    _remove(dst_fs, dst)
    parent = dst.rstrip("/").rpartition("/")[0]
    if parent:
        dst_fs.create_dir(parent, recursive=True)
    if kind == "dir":
        dst_fs.create_dir(dst, recursive=True)
    fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return True


def merge_tree(src_fs: Any, src: str, dst_fs: Any, dst: str) -> int:
    """Copy the files of folder ``src`` missing from ``dst`` (content-addressed: a name present is
    the same bytes); returns how many were copied."""
    from pyarrow import fs

    if path_kind(src_fs, src) != "dir":
        return 0
    copied = 0
    for info in src_fs.get_file_info(fs.FileSelector(src, recursive=True)):
        if info.type != fs.FileType.File:
            continue
        target = f"{dst}/{info.path[len(src.rstrip('/')) + 1 :]}"
        if path_kind(dst_fs, target) == "missing":
            dst_fs.create_dir(target.rpartition("/")[0], recursive=True)
            fs.copy_files(info.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
            copied += 1
    return copied


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
            if "://" in path or Path(path).is_absolute() or ".." in Path(path).parts:
                continue
            if path not in paths:
                paths.append(path)
    return paths


def save_state(root: Path, output: str) -> list[str]:
    """Copy ``dvc.lock``, ``params.yaml`` and the in-repo outputs of ``root`` to ``output``."""
    from pyarrow import fs

    local = fs.LocalFileSystem()
    out_fs, base = open_location(output)
    lock = root / LOCK
    saved = [LOCK, PARAMS] if lock.is_file() else [PARAMS]
    saved += state_paths(lock.read_text()) if lock.is_file() else []
    for rel in saved:
        copy_path(local, str(root / rel), out_fs, f"{base}/{rel}")
    merge_tree(local, str(root / ".dvc" / "cache"), out_fs, f"{base}/{CACHE}")
    return saved


def restore_state(output: str, root: Path) -> list[str]:
    """Copy the last saved ``dvc.lock`` and its outputs from ``output`` into ``root``."""
    from pyarrow import fs

    out_fs, base = open_location(output)
    if path_kind(out_fs, f"{base}/{LOCK}") != "file":
        return []
    with out_fs.open_input_stream(f"{base}/{LOCK}") as fh:
        lock_text = fh.read().decode()
    restored = [LOCK, *state_paths(lock_text)]
    local = fs.LocalFileSystem()
    for rel in restored:
        copy_path(out_fs, f"{base}/{rel}", local, str(root / rel))
    merge_tree(out_fs, f"{base}/{CACHE}", local, str(root / ".dvc" / "cache"))
    return restored


def write_record(output: str, record: dict[str, Any]) -> None:
    out_fs, base = open_location(output)
    out_fs.create_dir(base, recursive=True)
    with out_fs.open_output_stream(f"{base}/{JOB_RECORD}") as fh:
        fh.write((json.dumps(record, indent=2) + "\n").encode())


def read_record(output: str) -> dict[str, Any] | None:
    out_fs, base = open_location(output)
    if path_kind(out_fs, f"{base}/{JOB_RECORD}") != "file":
        return None
    with out_fs.open_input_stream(f"{base}/{JOB_RECORD}") as fh:
        return json.loads(fh.read().decode())


# --- the job --------------------------------------------------------------------------------------


def private_copy(src: Path) -> Path:
    """The uploaded tree copied to a fresh folder, without outputs an earlier job left in it."""

    def skip(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).resolve()
        if here == src.resolve():
            return _PRIVATE_SKIP & set(names)
        if here == (src / ".dvc").resolve():
            return _DVC_SKIP & set(names)
        return {"__pycache__"} & set(names)

    dest = Path(tempfile.mkdtemp(prefix="t2t-study-")) / "repo"
    shutil.copytree(src, dest, ignore=skip, symlinks=True)
    # The upload has no .git: let DVC run without one (dvc.lock, the run-cache and the skipping
    # rules do not depend on git).
    (dest / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")
    return dest


def _result_runs(root: Path) -> dict[str, str]:
    """``results/<variant>.json`` -> MLflow run id."""
    runs = {}
    for path in sorted((root / "results").glob("*.json")):
        try:
            runs[path.stem] = json.loads(path.read_text())["run_id"]
        except (ValueError, KeyError):
            continue
    return runs


def tag_runs(run_ids: list[str], tags: dict[str, str]) -> None:
    """Record the submitter's provenance on runs made in the job (best effort: never fails the job)."""
    if not run_ids:
        return
    try:
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import tracking_uri

        client = MlflowClient(tracking_uri(Path.cwd()))
        for run_id in run_ids:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
    except Exception as err:  # a tagging hiccup must not turn a finished study into a failure
        log.warning("could not tag MLflow runs %s: %s", run_ids, err)


def repro(root: Path, targets: list[str]) -> tuple[int, list[str]]:
    """``dvc repro [targets]`` in ``root``, its output streamed to the job's log."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "dvc", "repro", *targets]
    log.info("$ %s  (in %s)", " ".join(cmd[2:]), root)
    ran: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
    return proc.wait(), ran


def run_study(src: Path, output: str, targets: list[str]) -> int:
    """Restore, ``dvc repro``, save. Returns ``dvc repro``'s exit code."""
    started = time.time()
    for warning in check_study(load_config(src / PARAMS)):
        log.warning("%s", warning)
    root = private_copy(src)
    rc, ran = 1, []
    try:
        restored = restore_state(output, root)
        log.info("restored from %s: %s", output, ", ".join(restored) or "nothing (first run)")
        before = _result_runs(root)
        try:
            rc, ran = repro(root, targets)
        finally:
            saved = save_state(root, output)
            log.info("saved to %s: %s", output, ", ".join(saved))
            new_runs = [r for v, r in _result_runs(root).items() if before.get(v) != r]
            submission = os.environ.get(ENV_SUBMISSION, "")
            tag_runs(
                new_runs,
                {
                    "git_commit": os.environ.get(ENV_COMMIT, "unknown"),
                    "git_dirty": os.environ.get(ENV_DIRTY, "unknown"),
                    "ray_submission_id": submission,
                    "study_output": output,
                },
            )
            write_record(
                output,
                {
                    "submission_id": submission,
                    "git_commit": os.environ.get(ENV_COMMIT, "unknown"),
                    "git_dirty": os.environ.get(ENV_DIRTY, "unknown"),
                    "targets": targets,
                    "stages_run": ran,
                    "dvc_repro_exit_code": rc,
                    "seconds": round(time.time() - started, 1),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
    log.info("dvc repro exited %d after %.0f s; stages run: %s", rc, time.time() - started, ran or "none")
    return rc


def main() -> None:
    p = argparse.ArgumentParser(
        description="The Ray job's entrypoint (started by `python -m pipeline.submit`): "
        "restore the study's state from --output, dvc repro, save it back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, help="shared folder or object-store URI holding the state")
    p.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole DAG)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `ray job stop` sends SIGTERM: unwind through the finally blocks so the state is saved.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(run_study(Path.cwd(), args.output, args.targets))
    except (ConfigError, StudyError, StorageError) as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
