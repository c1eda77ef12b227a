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
   back to ``--output`` (also when a stage fails or ``ray job stop`` arrives, so the next job
   resumes from the stages that finished), stage-then-swap (:mod:`pipeline.state`), plus ``job.json``;
5. tags the MLflow runs it made with the submitter's git commit (the job's copy has no git).

The job holds a lease on ``--output`` (``job.lock``, renewed every 45 s) from the restore to the
end of the save: a second job on the same ``--output`` fails at once, naming the first.
``--output`` is a folder every node sees (NFS, a PVC) or an object-store URI (``s3://``, ``gs://``),
through :mod:`pipeline.storage`.
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

from pipeline.config import ConfigError, StudyConfig, load_config
from pipeline.state import PARAMS, StateError, job_lease, restore_state, save_state, write_record
from pipeline.storage import LeaseHeld, StorageError, is_uri

# Named explicitly: run as ``python -m pipeline.cluster`` the module is ``__main__``.
log = logging.getLogger("pipeline.cluster")

#: Environment the client sets for the job: the submitter's commit (the upload has no .git).
ENV_COMMIT, ENV_DIRTY, ENV_SUBMISSION = "STUDY_GIT_COMMIT", "STUDY_GIT_DIRTY", "STUDY_SUBMISSION_ID"
#: Never copied into the job's private folder: outputs and state of an earlier job in the same
#: (reused) unpacked upload, and DVC's per-checkout folders.
_PRIVATE_SKIP = {"data", "results", "reports", "runs", "mlflow.db", "mlartifacts", "__pycache__"}
_DVC_SKIP = {"cache", "tmp", "config.local"}


class StudyError(RuntimeError):
    """The study cannot run on a cluster as configured; the message says what to change."""


def _shared(path: str) -> bool:
    return is_uri(path) or Path(path).is_absolute()


def check_study(cfg: StudyConfig) -> list[str]:
    """Refuse params whose checkpoints or shards would die with the job; return warnings.

    Raises:
        StudyError: a variant's ``train.storage_path`` or ``data.shards.output`` is relative (it
            would resolve inside the job's temporary copy: checkpoints lost, multi-node training
            broken, and only the shards' manifest, never the tars, saved for the next job).
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
    if not _shared(cfg.data.shards.output):
        raise StudyError(
            f"data.shards.output {cfg.data.shards.output!r} is relative: on a cluster it resolves inside "
            "the job's temporary copy, so workers on other nodes cannot read the shards and the next job "
            "gets back only their manifest, never the tars. Set data.shards.output in params.yaml to "
            "storage every node sees (s3://bucket/t2t-shards, or a mount such as /mnt/shared/shards)."
        )
    return []


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


def _shield_from_stop() -> None:
    """Let the state save finish: a SIGTERM now is logged, not obeyed. ``pipeline.submit`` gives
    the job ``RAY_JOB_STOP_WAIT_TIME_S`` (10 minutes) before Ray's SIGKILL; a save cut even then
    is rolled forward by the next job (:mod:`pipeline.state`)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: log.warning("stop requested: finishing the save first"))


def run_study(src: Path, output: str, targets: list[str]) -> int:
    """Restore, ``dvc repro``, save, holding the lease on ``output``. Returns ``dvc repro``'s exit code.

    Raises:
        LeaseHeld: another job holds ``output``.
    """
    started = time.time()
    for warning in check_study(load_config(src / PARAMS)):
        log.warning("%s", warning)
    with job_lease(output):
        return _run_study(src, output, targets, started)


def _run_study(src: Path, output: str, targets: list[str], started: float) -> int:
    root = private_copy(src)
    rc, ran = 1, []
    try:
        restored = restore_state(output, root)
        log.info("restored from %s: %s", output, ", ".join(restored) or "nothing (first run)")
        before = _result_runs(root)
        try:
            rc, ran = repro(root, targets)
        finally:
            _shield_from_stop()
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
    except (ConfigError, StudyError, StorageError, StateError, LeaseHeld) as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
