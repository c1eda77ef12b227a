"""Run the whole study on a Ray cluster with one command, through the Ray Jobs API.

    python -m pipeline.submit --address http://HEAD:8265 --output s3://bucket/t2t-study \\
        --mlflow-uri http://mlflow.internal:5000

uploads the working tree (no ``.git``, data, virtualenv or outputs), runs ``dvc repro`` as a Ray
job (:mod:`pipeline.cluster`), waits for it, and copies the resulting ``dvc.lock``, metrics and
report from ``--output`` back into the working tree, so the local ``dvc status``, ``dvc metrics
show`` and ``git diff dvc.lock`` see what the cluster did. A failed job exits non-zero and prints
the tail of its log. The design (why ``dvc repro`` runs on the cluster, why state lives on shared
storage) is argued in docs/cluster.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pipeline.cluster import ENV_COMMIT, ENV_DIRTY, ENV_SUBMISSION, StudyError, check_study
from pipeline.config import ConfigError, load_config
from pipeline.paths import repo_root
from pipeline.state import PARAMS, StateError, fetch_state, job_lease
from pipeline.storage import StorageError, describe, resolve_location
from pipeline.tracking import TrackingUnavailable, check_tracking, git_state

log = logging.getLogger(__name__)

#: Never uploaded (gitignore syntax, relative to the repository root). Ray also skips what the
#: .gitignore files name; these hold even if they change. Outputs come back through --output.
#: Secrets and local state are excluded at any depth (the same list as .gitignore and the
#: .dockerignore files; tests/test_infra.py builds Ray's upload from a tree holding each).
SECRET_EXCLUDES = [".env", ".env.*", "*.pem", ".aws/", ".netrc", "mlflow.db", "runs/"]
EXCLUDES = [
    *SECRET_EXCLUDES,
    "/.git",
    "/.venv/",
    "/data/",
    "/results/",
    "/reports/",
    "/mlartifacts/",
    "/.dvc/cache/",
    "/.dvc/tmp/",
    "/.dvc/config.local",
    "__pycache__/",
    "*.egg-info/",
    "/.pytest_cache/",
    "/.ruff_cache/",
]


#: Seconds `ray job stop` gives the job to save its state.
STOP_GRACE_S = 600


class SubmitError(RuntimeError):
    """The study cannot be submitted or fetched as asked; the message says what to change."""


def runtime_env(root: Path, *, mlflow_uri: str, submission_id: str, git: dict[str, str]) -> dict[str, Any]:
    """The job's runtime environment: the working tree, the tracking server and provenance."""
    return {
        "working_dir": str(root),
        "excludes": EXCLUDES,
        "env_vars": {
            "MLFLOW_TRACKING_URI": mlflow_uri,
            # No .pyc in the job's copy: dvc.lock hashes pipeline/train and pipeline/models as folders.
            "PYTHONDONTWRITEBYTECODE": "1",
            ENV_COMMIT: git["git_commit"],
            ENV_DIRTY: git["git_dirty"],
            ENV_SUBMISSION: submission_id,
            # `ray job stop` waits this long after its SIGTERM before SIGKILL (Ray's default: 3 s),
            # so the job's state save (pipeline.state) always finishes.
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
        },
    }


def entrypoint(output: str, targets: list[str]) -> str:
    return shlex.join(["python", "-m", "pipeline.cluster", "--output", output, *targets])


def submit_study(
    client: Any,
    root: Path,
    *,
    output: str,
    mlflow_uri: str,
    targets: list[str],
    submission_id: str | None = None,
) -> str:
    """Submit ``dvc repro`` of the study at ``root`` as a Ray job; returns the job's id."""
    git = git_state(root)
    commit = git["git_commit"][:7] if git["git_commit"] != "unknown" else "nogit"
    submission_id = submission_id or f"t2t-study-{time.strftime('%Y%m%d-%H%M%S')}-{commit}"
    try:
        return client.submit_job(
            entrypoint=entrypoint(output, targets),
            submission_id=submission_id,
            runtime_env=runtime_env(root, mlflow_uri=mlflow_uri, submission_id=submission_id, git=git),
            metadata={"study_output": output, **git},
        )
    except Exception as err:  # upload too large, cluster unreachable, id taken: Ray's message says which
        raise SubmitError(f"submitting the job failed: {err}") from None


def wait_for(
    client: Any,
    job_id: str,
    *,
    poll_s: float = 10.0,
    heartbeat_s: float = 300.0,
    give_up_s: float = 1800.0,
) -> Any:
    """Poll the job until it ends, logging each status change; returns its final ``JobDetails``.

    A dropped connection to the dashboard (a restarted head, a broken port-forward) is retried
    with exponential backoff (1 s doubling to 60 s); the job goes on meanwhile.

    Raises:
        SubmitError: the dashboard stayed unreachable for ``give_up_s``.
    """
    start = last_beat = time.monotonic()
    status = None
    while True:
        info = _with_retries(lambda: client.get_job_info(job_id), job_id, give_up_s)
        now = time.monotonic()
        if info.status != status or now - last_beat >= heartbeat_s:
            status, last_beat = info.status, now
            log.info("job %s: %s (%.0f s)", job_id, status.value, now - start)
        if status.is_terminal():
            return info
        time.sleep(poll_s)


def _with_retries(call: Any, job_id: str, give_up_s: float) -> Any:
    delay, lost_at = 1.0, None
    while True:
        try:
            result = call()
        except (ConnectionError, OSError, RuntimeError) as err:  # requests' errors derive from OSError
            if "not exist" in str(err):  # the job is unknown: retrying cannot help
                raise
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > give_up_s:
                raise SubmitError(
                    f"lost the dashboard for {give_up_s:.0f} s ({err}); job {job_id} may still be running: "
                    f"check it with `ray job status {job_id}`, then fetch with --fetch-only"
                ) from None
            log.warning("dashboard unreachable (%s); retrying in %.0f s", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
            continue
        if lost_at is not None:
            log.info("dashboard reachable again after %.0f s", time.monotonic() - lost_at)
        return result


def follow(client: Any, job_id: str, out: TextIO) -> None:
    """Stream the job's log to ``out`` until the job ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def log_tail(client: Any, job_id: str, lines: int) -> str:
    """The last ``lines`` lines of the job's log."""
    text = client.get_job_logs(job_id)
    return "\n".join(text.splitlines()[-lines:])


def _dvc_cache_dir(root: Path) -> Path:
    """The local DVC cache (``.dvc/cache`` unless ``dvc cache dir`` moved it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "cache", "dir"], cwd=root, capture_output=True, text=True, timeout=60
    )
    out = proc.stdout.strip().splitlines()
    return Path(out[-1]) if proc.returncode == 0 and out else root / ".dvc" / "cache"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.submit",
        description=__doc__.split("\n\n")[0] + " See docs/cluster.md.",
    )
    env_address = os.environ.get("RAY_ADDRESS", "")
    p.add_argument(
        "--address",
        default=env_address if env_address.startswith("http") else None,
        help="the Ray dashboard of the cluster, http://HEAD:8265 (default: RAY_ADDRESS if it is a URL)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="the study's state on shared storage: s3://bucket/prefix, gs://..., or a folder mounted at "
        "the same path on the head node and here",
    )
    p.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or None,
        help="the shared MLflow tracking server the job logs to (default: MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the job to end (default)",
    )
    p.add_argument("--follow", action="store_true", help="stream the job's log here while waiting")
    p.add_argument(
        "--fetch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after success, copy dvc.lock, results and reports from --output into the working tree "
        "(default)",
    )
    p.add_argument(
        "--fetch-only", action="store_true", help="submit nothing; only fetch the last job's state"
    )
    p.add_argument("--job-id", help="the submission id (default: t2t-study-<time>-<commit>)")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (10)")
    p.add_argument("--tail", type=int, default=80, help="log lines printed when the job fails (80)")
    p.add_argument(
        "targets", nargs="*", help="dvc repro targets, e.g. train@t2t_vit_14 (default: the whole DAG)"
    )
    return p


def _fetch(output: str, root: Path) -> int:
    """Fetch the state; 0 on success, 1 (with the reason on stderr) when nothing was fetched."""
    try:
        fetched = fetch_state(output, root, _dvc_cache_dir(root))
    except (StateError, StorageError, OSError) as err:
        log.error("error: not fetched: %s", err)
        return 1
    log.info("fetched into %s: %s", root, ", ".join(fetched))
    if (root / "reports" / "comparison.md").is_file():
        log.info("report: %s", root / "reports" / "comparison.md")
    return 0


def check_output_free(output: str) -> None:
    """Refuse an ``--output`` a running job holds (its lease; the job itself re-checks at start).

    Raises:
        SubmitError: naming the job that holds it.
    """
    lease = job_lease(output)
    held = lease.read()
    if held and time.time() - float(held.get("heartbeat", 0)) < lease.ttl_s:
        raise SubmitError(
            f"{output} is in use by {describe(held)}: one job per --output at a time. Wait for it, stop it "
            f"(ray job stop {held.get('submission_id') or '<id>'}), or choose another --output."
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    root = repo_root()
    output = resolve_location(args.output)
    if args.fetch_only:
        return _fetch(output, root)
    if not args.address:
        sys.exit("error: --address http://HEAD:8265 is needed (or RAY_ADDRESS set to that URL)")
    if not args.mlflow_uri:
        sys.exit("error: --mlflow-uri (or MLFLOW_TRACKING_URI) is needed: the job's runs must outlive it")
    try:
        for warning in check_study(load_config(root / PARAMS)):
            log.warning("warning: %s", warning)
    except (ConfigError, StudyError) as err:
        sys.exit(f"error: {err}")
    try:
        check_output_free(output)
    except (SubmitError, StorageError) as err:
        sys.exit(f"error: {err}")
    try:
        check_tracking(args.mlflow_uri)
    except TrackingUnavailable as err:  # the cluster may see a host this machine does not
        log.warning("warning: %s (continuing: the job checks again from the cluster)", err)

    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = submit_study(
            client,
            root,
            output=output,
            mlflow_uri=args.mlflow_uri,
            targets=args.targets,
            submission_id=args.job_id,
        )
    except (SubmitError, ConnectionError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    address = client.get_address()
    log.info("submitted job %s", job_id)
    log.info("  dashboard: %s/#/jobs/%s", address, job_id)
    log.info("  MLflow:    %s", args.mlflow_uri)
    log.info("  log:       ray job logs --follow %s --address %s", job_id, address)
    log.info("  output:    %s", output)
    if not args.wait:
        return 0
    try:
        if args.follow:
            follow(client, job_id, sys.stdout)
        info = wait_for(client, job_id, poll_s=args.poll)
    except SubmitError as err:
        log.error("error: %s", err)
        return 1
    except KeyboardInterrupt:
        log.warning(
            "stopped waiting; the job goes on. Stop it with: ray job stop %s --address %s", job_id, address
        )
        return 130
    if info.status != JobStatus.SUCCEEDED:
        sys.stderr.write(f"---- the last {args.tail} lines of job {job_id}'s log ----\n")
        sys.stderr.write(log_tail(client, job_id, args.tail) + "\n")
        reason = (info.message or "").splitlines()[0] if info.message else ""
        sys.stderr.write(f"---- job {job_id} {info.status.value}: {reason}\n")
        return 1
    return _fetch(output, root) if args.fetch else 0


if __name__ == "__main__":
    sys.exit(main())
