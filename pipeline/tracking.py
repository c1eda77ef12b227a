"""MLflow plumbing: where the tracking store is, whether it answers, and what every run is tagged with.

Default store: ``sqlite:///<repo>/mlflow.db`` (an absolute path, so Ray workers and DVC
experiment copies all log to the same file). ``MLFLOW_TRACKING_URI`` points elsewhere, such as a
shared ``mlflow server`` on a cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.paths import checkout_root, resolve_state

log = logging.getLogger(__name__)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file at the root of the user's checkout (also
    under ``dvc exp run --temp/--queue``: :func:`pipeline.paths.checkout_root`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{(checkout_root(root) / 'mlflow.db').resolve()}"


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any worker starts, if the tracking store cannot be used.

    Raises:
        TrackingUnavailable: naming the URI and what to do.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-given URI)
                if resp.status != 200:
                    raise TrackingUnavailable(f"MLflow server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({err}). Start it, fix MLFLOW_TRACKING_URI, "
                "or unset MLFLOW_TRACKING_URI to use the local SQLite store."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingUnavailable(
                f"MLflow SQLite store {uri}: folder {folder} is missing or not writable"
            )


def git_state(root: Path) -> dict[str, str]:
    """The commit and whether the work tree is dirty, or 'unknown' outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": dirty}


def file_sha256(path: Path) -> str:
    """sha256 of a local file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(location: str | Path) -> str:
    """sha256 of a file's bytes, local (a path) or remote (an fsspec URI such as ``s3://b/manifest.json``);
    used for the data manifest tag."""
    if "://" not in str(location):
        return file_sha256(Path(location))
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(str(location), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``, for logging nested config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


#: MLflow 3's UI opens an experiment by its kind: model training shows the runs table and charts
#: first (without the tag it may infer the GenAI view of traces and judges).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def experiment_id(client: Any, name: str, uri: str, root: Path) -> str:
    """The id of experiment ``name``, created if missing (a local store keeps artifacts beside mlflow.db)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND) is None:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment.experiment_id
    location = resolve_state("mlartifacts", root).as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})


def child_run(client: Any, parent: str, experiment: str, name: str, tags: Mapping[str, str]) -> str:
    """A new run under ``parent`` (tag ``mlflow.parentRunId``); returns its id."""
    run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent, **tags})
    return run.info.run_id


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """One ``log_batch`` of ``metrics`` at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


@contextmanager
def tracked_run(client: Any, run_id: str, *, interrupted: threading.Event | None = None) -> Iterator[str]:
    """Mark the MLflow run ``run_id`` terminated when the block ends: FINISHED when it returns, KILLED when
    it is interrupted (``KeyboardInterrupt``, ``SystemExit``, or ``interrupted`` set), FAILED otherwise.

    The one way training and tuning end their runs, so a crash never leaves a run RUNNING.
    """
    status, error = "FAILED", None
    try:
        yield run_id
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as err:
        status, error = "KILLED", err
        raise
    except BaseException as err:
        error = err
        if interrupted is not None and interrupted.is_set():
            status = "KILLED"
        raise
    finally:
        _mark_terminated(client, run_id, status, error)


def _mark_terminated(client: Any, run_id: str, status: str, error: BaseException | None) -> None:
    """``set_terminated``; if the store is gone (a stopped server) the block's own error, if any, is
    what propagates, with a note that the status could not be written: never the store's error."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as err:
        note = (
            f"MLflow run {run_id} could not be marked {status} ({type(err).__name__}: {err}); "
            "it keeps its last status in the store. Checkpoints are kept: re-running resumes."
        )
        if error is None:
            raise TrackingUnavailable(note) from err
        error.add_note(note)
        log.error("%s", note)
