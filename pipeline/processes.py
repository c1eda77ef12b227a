"""Work spread over processes: one task per process at a time, results as they complete.

The shard stage writes and checks shards this way (:mod:`pipeline.shards`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["run_in_processes", "start_method"]


def start_method() -> str:
    """``fork`` when this process runs one thread, else a fork server (or spawn where there is none).

    Forking copies the imports, so a worker starts in milliseconds; it is safe only with no other
    thread that could hold a lock mid-flight (tqdm's monitor, s3fs's event loop, torch's pools
    under pytest). A fork server costs about a second once, and is the default from Python 3.14.
    """
    methods = multiprocessing.get_all_start_methods()
    single = False
    if threading.active_count() == 1 and os.path.isdir("/proc/self/task"):  # no /proc: do not guess
        # Every OS thread, not only Python's. A thread joined a moment ago (the listing's pool) may
        # still be leaving the kernel's list: give it a few milliseconds.
        for _ in range(20):
            if single := len(os.listdir("/proc/self/task")) == 1:
                break
            time.sleep(0.005)
    if single and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def run_in_processes(
    fn: Callable[[Any], Any], tasks: list[Any], workers: int, preload: Sequence[str] = ()
) -> tuple[Iterator[Any], str]:
    """``fn`` over ``tasks``, results as they complete, and how the work was started: in this process
    with one worker (``in-process``), else in a pool of processes (the start method), one task
    (shard) at a time per process. The processes start, and every task is submitted, before this
    returns: call it before starting any thread (a progress bar). ``preload``: modules a fork server
    imports once for all its workers."""
    if workers <= 1 or len(tasks) <= 1:
        return map(fn, tasks), "in-process"
    method = start_method()
    log.info("%d worker processes (start method: %s)", min(workers, len(tasks)), method)
    context = multiprocessing.get_context(method)
    if method == "forkserver" and preload:  # imported once by the server, not once per worker
        context.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context)
    futures = [pool.submit(fn, t) for t in tasks]

    def results() -> Iterator[Any]:
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # normal end, an error or Ctrl-C: nothing new starts; running shards finish or die
            pool.shutdown(wait=True, cancel_futures=True)

    return results(), method
