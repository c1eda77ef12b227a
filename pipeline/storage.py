"""Local folders and object stores behind one small API, on fsspec.

Everything the pipeline keeps outside the repository (shards, the study's state between cluster
jobs, checkpoints' leases) is a *location*: a local folder or an fsspec URI (``s3://``, ``gs://``,
``memory://``). :func:`is_uri` is the one test for "remote"; :class:`Location` reads, writes,
copies and lists under a location's root with paths relative to it; :func:`atomic_write` writes
a local file through a temporary file and a rename; :class:`Lease` is a lock object with a
heartbeat, so two processes never own the same output at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A location cannot be opened, read or written; the message names it."""


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` is an fsspec URI (``s3://b/k``, ``file:///x``) rather than a local path."""
    return "://" in str(path)


def resolve_location(path: str | Path, root: Path | None = None) -> str:
    """A URI unchanged; a local path made absolute (relative paths against ``root`` or the cwd)."""
    if is_uri(path):
        return str(path)
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else ((root or Path.cwd()) / p).resolve())


def atomic_write(path: str | Path, data: bytes | str, *, exclusive: bool = False) -> bool:
    """Write a local file so a reader sees the old bytes or the new, never a part: a temporary
    file in the same folder, fsynced, then renamed over ``path``.

    With ``exclusive``, the temporary file is hard-linked to ``path`` instead, which fails if
    ``path`` exists (atomic on local filesystems and NFS): nothing is written and the result is
    False. Otherwise the result is True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        if not exclusive:
            raise
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


class Location:
    """A folder, local or remote; every path argument is relative to it ("" is the folder)."""

    def __init__(self, url: str | Path) -> None:
        import fsspec

        self.url = resolve_location(url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except Exception as err:  # unknown protocol, missing s3fs, bad URI: fsspec's message says which
            raise StorageError(f"cannot open the location {self.url!r}: {err}") from None
        self.root = self.root.rstrip("/")
        self.local = not is_uri(self.url) or self.url.startswith("file://")

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url.rstrip('/')}/{rel}".rstrip("/") if rel else self.url

    def kind(self, rel: str = "") -> str:
        """``"file"``, ``"dir"`` or ``"missing"``."""
        try:
            info = self.fs.info(self.path(rel))
        except FileNotFoundError:
            return "missing"
        return "dir" if info["type"] == "directory" else "file"

    def exists(self, rel: str = "") -> bool:
        return self.kind(rel) != "missing"

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes | str) -> None:
        """Replace one file whole: temp + rename locally; one PUT (atomic per object) remotely."""
        raw = data.encode() if isinstance(data, str) else data
        if self.local:
            atomic_write(self.path(rel), raw)
            return
        self.fs.pipe_file(self.path(rel), raw)

    def create(self, rel: str, data: bytes | str) -> bool:
        """Write a new local file whole, only if none is there: False if one is (a rival's).
        :func:`atomic_write` with ``exclusive``. Local locations only (object stores have no
        portable create-if-absent)."""
        if not self.local:
            raise StorageError(f"create-if-absent is local only, not {self.url}")
        return atomic_write(self.path(rel), data, exclusive=True)

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, as paths relative to the location, sorted."""
        base = self.path(rel)
        if self.kind(rel) != "dir":
            return [rel] if self.kind(rel) == "file" else []
        out = []
        for found in self.fs.find(base):
            out.append(found[len(self.root) + 1 :] if found.startswith(self.root + "/") else found)
        return sorted(out)

    def remove(self, rel: str) -> None:
        kind = self.kind(rel)
        if kind == "dir":
            self.fs.rm(self.path(rel), recursive=True)
        elif kind == "file":
            self.fs.rm_file(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst`` (a rename locally; copy + delete on object stores)."""
        self.remove(dst)
        parent = dst.rpartition("/")[0]
        self.makedirs(parent)
        if self.local:
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)


def copy(src: Location, src_rel: str, dst: Location, dst_rel: str, *, only_missing: bool = False) -> int:
    """Copy file or folder ``src_rel`` of ``src`` to ``dst_rel`` of ``dst`` (any pair of
    locations, through a local staging file where neither side is local); returns how many files.

    ``only_missing`` copies only files absent from ``dst`` (content-addressed trees such as DVC's
    cache, where a present name is the same bytes).
    """
    copied = 0
    for rel in src.files(src_rel):
        tail = rel[len(src_rel) :].lstrip("/") if src_rel else rel
        target = f"{dst_rel}/{tail}".strip("/") if tail else dst_rel
        if only_missing and dst.exists(target):
            continue
        dst.makedirs(target.rpartition("/")[0])
        if src.local and dst.local:
            tmp = dst.path(target) + f".{uuid.uuid4().hex[:8]}.tmp"
            src.fs.get_file(src.path(rel), tmp)
            os.replace(tmp, dst.path(target))
        elif src.local:
            dst.fs.put_file(src.path(rel), dst.path(target))
        elif dst.local:
            tmp = dst.path(target) + f".{uuid.uuid4().hex[:8]}.tmp"
            src.fs.get_file(src.path(rel), tmp)
            os.replace(tmp, dst.path(target))
        else:
            dst.fs.pipe_file(dst.path(target), src.read_bytes(rel))
        copied += 1
    return copied


# --- local trees ---


def printable(path: str) -> str:
    """``path`` with bytes that are not UTF-8 (held as surrogates by ``os``) shown as ``\\x..``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unusable(entry: os.DirEntry, root: str | Path) -> str | None:
    """Why a local directory entry cannot be read as data of the tree ``root``, or None: a name
    that is not UTF-8, a broken symlink, a symlink out of the tree (never followed)."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (a tar member name must be): rename it"
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if not os.path.exists(target):
            return f"broken symlink (to {printable(os.readlink(entry.path))}): fix or remove it"
        if not (target + os.sep).startswith(_real_dir(str(root))):
            return f"symlink out of the source tree (to {printable(target)}): not followed"
    return None


@functools.lru_cache(maxsize=64)
def _real_dir(root: str) -> str:
    return os.path.realpath(root) + os.sep


def list_dir(
    folder: Path, bad: list[dict[str, str]] | None = None, root: Path | None = None
) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(files, sub-folders) of a local ``folder``, sorted by name. With ``bad``, :func:`unusable`
    entries are appended to it as ``{"path", "reason"}`` (relative to ``root``) instead."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    if bad is not None:
        base = root or folder
        why = {e.path: unusable(e, base) for e in entries}
        bad += [{"path": printable(os.path.relpath(p, base)), "reason": r} for p, r in why.items() if r]
        entries = [e for e in entries if not why[e.path]]
    return [e for e in entries if e.is_file()], [e for e in entries if e.is_dir()]


# --- leases ----------------------------------------------------------------------------------------


class LeaseHeld(RuntimeError):
    """Another live process holds the lease; the message names it and says what to do."""


def _owner() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "id": uuid.uuid4().hex,
        "ray_job_id": os.environ.get("RAY_JOB_ID", ""),
        "submission_id": os.environ.get("STUDY_SUBMISSION_ID", ""),
    }


class Lease:
    """A lock object with a heartbeat in a :class:`Location`: ``with Lease(loc, "x.lock", what=...)``.

    Acquiring fails at once with :class:`LeaseHeld`, naming the holder, while another process's
    heartbeat is younger than ``ttl_s``; a lease whose holder stopped beating (a SIGKILLed process,
    a lost node) is taken over after ``ttl_s``. A background thread rewrites the record every
    ``ttl_s / 4``; with ``thread=False`` the holder calls :meth:`renew` itself (a process that
    forks workers stays single-threaded).

    On a local filesystem a free lease is claimed with one create-if-absent
    (:meth:`Location.create`): of two processes starting at the same moment, one creates the lock
    and the other fails, naming it, with no wait. Object stores offer no create-if-absent that every
    backend honours, and taking over a dead holder's lock replaces a file that exists, so there two
    processes can both write their claim. Each then waits ``settle_s`` and reads the lock back: the
    last record written is the one both read, and the other fails. (Without the wait, one could read
    its own record back before the other wrote, and both would hold the lease.) That claim is safe
    as long as a process's check and write are less than ``settle_s`` apart, which they are by orders
    of magnitude.
    """

    def __init__(
        self,
        location: Location,
        name: str,
        *,
        what: str,
        ttl_s: float = 120.0,
        thread: bool = True,
        settle_s: float = 0.5,
        **info: Any,
    ):
        self.location, self.name, self.what, self.ttl_s, self.threaded = location, name, what, ttl_s, thread
        self.settle_s = settle_s
        self.held = False
        self.record = {**_owner(), "what": what, **info}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.location.url_of(self.name)

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.location.read_text(self.name))
        except (FileNotFoundError, ValueError):
            return None

    def _record(self) -> str:
        return json.dumps({**self.record, "heartbeat": time.time()})

    def _write(self) -> None:
        self.location.write_bytes(self.name, self._record())

    def acquire(self) -> Lease:
        """Take the lease (a no-op if this object holds it already).

        Raises:
            LeaseHeld: another process's heartbeat is younger than ``ttl_s`` and, if it is on this
                host, that process is alive.
        """
        if self.held:
            return self
        held = self.read()
        if held and held.get("id") != self.record["id"]:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < self.ttl_s and not _dead_here(held):
                raise LeaseHeld(
                    f"{self.what} is in use by {describe(held)} (lock {self.url}, heartbeat "
                    f"{age:.0f} s ago). Wait for it to end, or stop it; if it is dead the lock expires "
                    f"{self.ttl_s - age:.0f} s from now (or delete the lock file once you are sure)."
                )
            log.warning("taking over %s: its holder %s stopped %.0f s ago", self.url, describe(held), age)
        claimed = False
        if held is None and self.location.local:  # free and local: one create-if-absent
            claimed = self.location.create(self.name, self._record())
            if not claimed and (rival := self.read()) is not None:
                raise LeaseHeld(f"{self.what} was claimed at once by {describe(rival)}: {self.url}")
        if not claimed:  # remote, a takeover, or an unreadable lock file: write, settle, read back
            self._write()
            time.sleep(self.settle_s)  # a rival that found no lease either has written by now
            back = self.read()
            if not back or back.get("id") != self.record["id"]:
                raise LeaseHeld(f"{self.what} was claimed at once by {describe(back or {})}: {self.url}")
        self.held = True
        if self.threaded:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat, name=f"lease:{self.name}", daemon=True)
            self._thread.start()
        return self

    def renew(self) -> None:
        """Write a fresh heartbeat (the thread does this unless ``thread=False``)."""
        held = self.read()
        if held and held.get("id") != self.record["id"]:
            log.error("lost %s to %s", self.url, describe(held))
            return
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as err:  # storage hiccup: try again at the next beat
                log.warning("could not renew %s: %s", self.url, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        held = self.read()
        if held and held.get("id") == self.record["id"]:
            self.location.remove(self.name)
        self.held = False

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _dead_here(record: dict[str, Any]) -> bool:
    """Whether the record's holder ran on this host and its process is gone (SIGKILLed, crashed)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def describe(record: dict[str, Any]) -> str:
    """``pid 123 on host-a (Ray job raysubmit_x)``, from a lease record."""
    where = f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
    job = record.get("submission_id") or record.get("ray_job_id")
    return f"{where} ({'job ' + job + ', ' if job else ''}{record.get('what', '')})".replace(", )", ")")


# --- tar shards ------------------------------------------------------------------------------------


class HashingStream:
    """A read-only stream that hashes what passes through; :meth:`finish` reads the rest and
    returns the sha256. ``close`` waits for :meth:`finish` (a tar reader may close early)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        self.stream.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        pass


def shard_ends_problem(url: str, expect: dict[str, Any] | None = None) -> str | None:
    """What is wrong with the end of a tar shard on a file system or object store, or None: it
    must end with the two zero blocks of a complete tar (a tar reader stops silently at a cut on a
    member boundary) and, with ``expect`` (its manifest record), be ``expect["bytes"]`` long.
    ``pipe:`` and ``http(s)://`` shards are not checked."""
    import fsspec

    if url.startswith(("pipe:", "http://", "https://")):
        return None
    fs, path = fsspec.core.url_to_fs(url)
    size = fs.size(path)
    if expect is not None and size != int(expect["bytes"]):
        return f"is {size} bytes, its manifest record {expect['bytes']}: it was cut or replaced"
    with fs.open(path, "rb") as fh:
        fh.seek(max(0, size - 1024))
        if size < 1024 or fh.read(1024) != bytes(1024):
            return "does not end with a tar's two zero blocks: it is cut"
    return None
