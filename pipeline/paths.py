"""Where things live: the repository root and the default locations under it."""

from __future__ import annotations

from pathlib import Path


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the cwd) holding ``dvc.yaml``.

    DVC runs every stage from the repository root, so this is normally the cwd; resolving it
    explicitly keeps defaults (the MLflow SQLite file, Ray's storage) absolute, so Ray workers and
    ``dvc exp run --temp`` copies never write into a throw-away directory.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """``path`` made absolute against the repository root (absolute paths pass through)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or repo_root()) / p
