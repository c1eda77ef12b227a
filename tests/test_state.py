"""The study's state on shared storage survives the faults a cluster job meets: a save cut by
``ray job stop`` (SIGTERM raises SystemExit in the job), a second job on the same ``--output``
(a real second process holding the lease), a SIGKILLed holder, a relative shards path, and a
fetch with nothing to fetch. Real files, real processes, real DVC lock files; nothing mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline.state import JOB_LOCK, LOCK, SWAP, job_lease, restore_state, save_state
from pipeline.storage import Lease, LeaseHeld, Location, atomic_write, is_uri, resolve_location

ROOT = Path(__file__).resolve().parents[1]

LOCK_V = """schema: '2.0'
stages:
  make:
    cmd: make
    outs:
    - path: data/out
      hash: md5
      md5: {v}
    - path: results/r.json
      hash: md5
      md5: {v}
"""


def _workspace(folder: Path, version: str) -> Path:
    """A job's copy after `dvc repro`: dvc.lock, params and the two outputs it lists, all at ``version``."""
    (folder / "data" / "out").mkdir(parents=True, exist_ok=True)
    (folder / "results").mkdir(exist_ok=True)
    (folder / ".dvc" / "cache").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / "data" / "out" / f"{i}.txt").write_text(version)
    (folder / "results" / "r.json").write_text(f'{{"v": "{version}"}}')
    (folder / "params.yaml").write_text(f"v: {version}\n")
    (folder / LOCK).write_text(LOCK_V.format(v=version))
    return folder


def _state(root: Path) -> set[str]:
    """The versions a restored workspace holds: one value when it is consistent."""
    files = [root / LOCK, root / "results" / "r.json", *sorted((root / "data" / "out").glob("*.txt"))]
    return {("v1" if "v1" in f.read_text() else "v2") for f in files}


def test_is_uri_and_resolve_location(tmp_path: Path) -> None:
    assert is_uri("s3://b/k") and is_uri("file:///x") and not is_uri("/mnt/x") and not is_uri("data/x")
    assert resolve_location("s3://b/k") == "s3://b/k"
    assert resolve_location("data/x", tmp_path) == str(tmp_path / "data" / "x")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 123)  # type: ignore[arg-type]  # fails before the rename
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("cut_after_moves", [0, 1, 2])
def test_a_save_cut_by_job_stop_is_rolled_forward_never_half_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_after_moves: int
) -> None:
    output = str(tmp_path / "shared" / "state")
    save_state(_workspace(tmp_path / "job1", "v1"), output)
    job2 = _workspace(tmp_path / "job2", "v2")

    # `ray job stop` during the swap: the job's SIGTERM handler raises SystemExit mid-save.
    moves = []
    real_move = Location.move

    def stopped(self: Location, src: str, dst: str) -> None:
        if len(moves) == cut_after_moves:
            raise SystemExit(143)
        moves.append(dst)
        real_move(self, src, dst)

    monkeypatch.setattr(Location, "move", stopped)
    with pytest.raises(SystemExit):
        save_state(job2, output)
    monkeypatch.undo()
    assert (Path(output) / SWAP).is_file(), "the interrupted save left its plan"
    assert "v1" in (Path(output) / LOCK).read_text(), "dvc.lock is written last"

    # The next job's restore finishes the save first: everything v2, nothing mixed, nothing lost.
    restored = tmp_path / "job3"
    restored.mkdir()
    assert set(restore_state(output, restored)) == {LOCK, "data/out", "results/r.json"}
    assert _state(restored) == {"v2"}
    assert not (Path(output) / SWAP).exists()
    assert not list((Path(output) / ".staging").glob("*")), "the staging folder is cleaned up"


def test_a_save_cut_while_staging_leaves_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.state as state

    output = str(tmp_path / "state")
    save_state(_workspace(tmp_path / "job1", "v1"), output)
    calls = []

    def stopped(*args: object, **kwargs: object) -> int:
        if len(calls) == 2:  # the cache, then the first staged path: stop before the rest
            raise SystemExit(143)
        calls.append(args)
        return real_copy(*args, **kwargs)

    real_copy = state.copy
    monkeypatch.setattr(state, "copy", stopped)
    with pytest.raises(SystemExit):
        save_state(_workspace(tmp_path / "job2", "v2"), output)
    monkeypatch.undo()
    restored = tmp_path / "job3"
    restored.mkdir()
    restore_state(output, restored)
    assert _state(restored) == {"v1"}


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline.state import job_lease
    lease = job_lease(sys.argv[1], submission_id="raysubmit_first")
    lease.ttl_s = float(sys.argv[2])
    with lease:
        print("held", flush=True)
        time.sleep(600)
    """
)


def _holder(output: str, ttl: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, output, str(ttl)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_on_the_same_output_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    output = str(tmp_path / "state")
    first = _holder(output, ttl=600)
    try:
        tic = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"pid {first.pid} on .*raysubmit_first"):
            job_lease(output).acquire()
        assert time.monotonic() - tic < 5, "fails at once, not after a timeout"
        # The client refuses too, before uploading anything.
        from pipeline.submit import SubmitError, check_output_free

        with pytest.raises(SubmitError, match="raysubmit_first"):
            check_output_free(output)
    finally:
        first.kill()
        first.wait()


def test_a_killed_holders_lease_is_taken_over_here_at_once_and_elsewhere_after_its_ttl(
    tmp_path: Path,
) -> None:
    import json
    import socket

    output = str(tmp_path / "state")
    first = _holder(output, ttl=600)
    first.send_signal(signal.SIGKILL)  # no release: the lock object stays behind, its heartbeat fresh
    first.wait()
    lease = Lease(Location(output), JOB_LOCK, what="the state", ttl_s=600)
    with lease:  # same host, process gone: taken over without waiting for the TTL
        assert lease.read()["pid"] == os.getpid()
    assert not (Path(output) / JOB_LOCK).exists(), "released"

    # A holder on another node cannot be checked for life: only its heartbeat's age counts.
    record = {"host": f"not-{socket.gethostname()}", "pid": 1, "id": "x", "what": "the state"}
    (Path(output) / JOB_LOCK).write_text(json.dumps({**record, "heartbeat": time.time()}))
    short = Lease(Location(output), JOB_LOCK, what="the state", ttl_s=2)
    with pytest.raises(LeaseHeld, match="pid 1 on not-"):
        short.acquire()
    time.sleep(2.1)
    with short:
        assert short.read()["pid"] == os.getpid()


def test_a_relative_shards_path_is_refused_on_a_cluster(root: Path, tmp_path: Path) -> None:
    from pipeline.cluster import StudyError, check_study
    from pipeline.config import load_config

    raw = yaml.safe_load((root / "profiles" / "mini.yaml").read_text())
    raw["train"]["storage_path"] = "/mnt/shared/ray"  # the checkpoints are fine: only the shards are not
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")
    assert not is_uri(cfg.data.shards.output) and not Path(cfg.data.shards.output).is_absolute()
    with pytest.raises(StudyError, match=r"data.shards.output .* is relative.*never the tars"):
        check_study(cfg)
    raw["data"]["shards"]["output"] = "s3://bucket/shards"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert check_study(load_config(tmp_path / "params.yaml")) == []


def test_fetch_only_with_nothing_to_fetch_exits_nonzero(tmp_path: Path, root: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"x": 1}))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.submit", "--output", str(tmp_path / "empty"), "--fetch-only"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "nothing to fetch" in proc.stderr


_RIVAL = """
import sys, time
from pipeline.storage import Lease, LeaseHeld, Location
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every rival checks the lock at the same moment
try:
    with Lease(Location(sys.argv[1]), "race.lock", what="the race", ttl_s=60, thread=False):
        print("held", flush=True)
        time.sleep(3)
except LeaseHeld as err:
    print("refused:", err, flush=True)
"""


@pytest.mark.parametrize("lock", ["absent", "dead holder's"])
def test_rivals_starting_at_the_same_moment_get_one_lease(tmp_path: Path, lock: str) -> None:
    """Four processes check the lock at the same instant. Absent: the local create-if-absent lets one
    claim it. A dead holder's (a heartbeat far past its ttl): all four take it over, each writing
    its claim, and the settle-and-read-back of Lease.acquire leaves one holder. Either way the
    others fail naming the holder."""
    if lock != "absent":
        record = {"host": "elsewhere", "pid": 1, "id": "dead", "what": "the race", "heartbeat": 0.0}
        (tmp_path / "race.lock").write_text(json.dumps(record))
    start = time.time() + 4  # after every interpreter has started
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rivals = [
        subprocess.Popen(
            [sys.executable, "-c", _RIVAL, str(tmp_path), str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=60)[0] for proc in rivals]
    # A takeover also logs a warning (stderr, merged) before its outcome.
    assert sum("held" in out.splitlines() for out in outputs) == 1, outputs
    refused = [out for out in outputs if "held" not in out.splitlines()]
    assert all("refused:" in out and "the race" in out for out in refused), outputs


def test_create_if_absent_and_a_lock_file_nobody_can_read(tmp_path: Path) -> None:
    """``Location.create`` writes a new file whole, or nothing where one is; an unreadable lock file
    (empty, cut) does not block a claim forever: it is replaced through the settle path."""
    loc = Location(tmp_path)
    assert loc.create("a.lock", b"first") and not loc.create("a.lock", b"second")
    assert (tmp_path / "a.lock").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lock"]  # no temporary file left
    (tmp_path / "b.lock").write_text("{cut")
    with Lease(loc, "b.lock", what="b", ttl_s=60, thread=False, settle_s=0.05) as lease:
        assert json.loads((tmp_path / "b.lock").read_text())["id"] == lease.record["id"]
    assert not (tmp_path / "b.lock").exists()
