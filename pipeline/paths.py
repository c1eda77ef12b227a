"""Where things live: the repository root and the default locations under it."""

from __future__ import annotations

from pathlib import Path


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the cwd) holding ``dvc.yaml``.

    DVC runs every stage from the repository root, so this is normally the cwd: a stage's outputs
    are resolved against it. Under ``dvc exp run --temp`` or ``--queue`` it is DVC's copy of the
    repository; state that must outlive the copy is resolved against :func:`checkout_root`.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def checkout_root(start: str | Path | None = None) -> Path:
    """The user's checkout: :func:`repo_root`, or, inside a ``dvc exp run --temp`` or ``--queue`` copy
    (``<checkout>/.dvc/tmp/exps/...``), the checkout the experiment was started from.

    State shared by every experiment lives here, never in the throw-away copy: the MLflow SQLite
    store and its artifacts, and Ray's checkpoint storage. A stage's outputs stay in
    :func:`repo_root`, where DVC looks for them.
    """
    root = repo_root(start)
    parts = root.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            checkout = Path(*parts[:i])
            if (checkout / "dvc.yaml").is_file():
                return checkout
    return root


def resolve_state(path: str | Path, root: Path | None = None) -> Path:
    """``path`` made absolute against the user's checkout (:func:`checkout_root` of ``root``)."""
    return resolve(path, checkout_root(root))


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """``path`` made absolute against the repository root (absolute paths pass through)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or repo_root()) / p
