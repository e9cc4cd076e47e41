"""Validation and tokenisation over several processes (data.num_proc), with the same result as one.

trainables/data.py hands `over_ranges` a function of a row range [start, stop) that converts and checks
those rows (the RowCheck, i.e. tokenisation, included). Each row is handled on its own, so contiguous
ranges run in forked processes and concatenated in order give exactly the values, problems and problem
order of one pass. Fork, not spawn: the rows already read, the converter and the tokenizer are inherited
(closures that could not be pickled); only each range's results are pickled back. A process that dies
(killed, usually for memory) is a DataWorkerError naming data.num_proc, never a hung driver.
`without_gc` pauses Python's cyclic garbage collector while loading. Tested by
`python -m pytest tests/test_token_store.py -q`; measured by bench/data_scale.py.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from trainables.errors import UserError

# Rows checked per process below this count: starting processes costs more than it saves (bench/data_scale.py).
PARALLEL_MIN_ROWS = 20_000
AUTO_MAX_PROCS = 8
ROWS_PER_CHUNK = 50_000  # rows converted and tokenised at once, in one process or each worker
_WORK: list[Callable] = []  # the range function forked workers run: inherited at the fork, never pickled


class DataWorkerError(UserError, RuntimeError):
    """A process of data.num_proc died (killed, usually for memory) before its rows were checked."""


def without_gc(function: Callable) -> Callable:
    """Runs `function` with the cyclic garbage collector paused: reading and tokenising allocate millions of
    acyclic dicts and tuples, and each full collection walks all of them (1M rows: over half the time)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return run


def resolve_num_proc(num_proc: int | None, rows: int) -> int:
    """Processes to validate and tokenise `rows` rows with: num_proc as given; None (auto) = the usable CPUs
    (at most AUTO_MAX_PROCS), but 1 under PARALLEL_MIN_ROWS rows."""
    if num_proc is not None:
        return max(1, min(num_proc, rows // 2 or 1))
    if rows < PARALLEL_MIN_ROWS:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, AUTO_MAX_PROCS))


def _run_chunk(chunk: tuple[int, int]):
    return _WORK[0](*chunk)


def over_ranges(work: Callable[[int, int], Any], total: int, num_proc: int,
                source: str) -> Iterator[tuple[int, int, Any]]:
    """(start, stop, work(start, stop)) for contiguous ranges covering [0, total), in order: computed here,
    one range at a time, or in `num_proc` forked processes (fork: the rows, converter and tokenizer are
    inherited; only results are pickled back). Every worker is forked before the first range is yielded, so
    the caller may release a range's rows once it has its result."""
    # a few chunks per process, so that a slow one does not hold up the end; at most ROWS_PER_CHUNK rows each,
    # so that a chunk's texts, token ids and tokenizer output are freed before the next (driver memory)
    serial = num_proc <= 1 or "fork" not in multiprocessing.get_all_start_methods()
    size = ROWS_PER_CHUNK if serial else max(1, min(ROWS_PER_CHUNK, -(-total // (num_proc * 4))))
    chunks = [(start, min(start + size, total)) for start in range(0, total, size)] or [(0, 0)]
    if serial:
        for start, stop in chunks:
            yield start, stop, work(start, stop)
        return
    _WORK[:] = [work]
    try:  # an executor, not a Pool: a worker killed (out of memory) raises here instead of hanging the driver
        with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork")) as pool:
            results = pool.map(_run_chunk, chunks)  # submits every chunk: with fork, every worker starts now
            for (start, stop), result in zip(chunks, results):
                yield start, stop, result
    except BrokenProcessPool as error:
        raise DataWorkerError(
            f"{source}: a process validating and tokenising rows (data.num_proc={num_proc}) died, most likely out "
            "of memory; set data.num_proc lower (1: no extra process) or give the machine more memory") from error
    finally:
        _WORK.clear()
