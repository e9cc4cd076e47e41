"""Hand trials a value the driver has not got yet: the sweep's MLflow parent run, opened while Tune starts.

Opening the parent run needs the tracking server; the embedded one takes seconds to start (6-10 s measured
on 2 cores), and logging the run's params and dataset inputs about 2 s more. Tune's start and the first
trial actor's imports take as long, so a fresh sweep does both at once: the driver opens the run in a
thread and puts (uri, experiment id, parent run id) into a `Handoff` actor; a trial that starts first
waits on `get` (trial.TrialTracking.resolved) before it opens its own child run. The actor reserves no CPU
and imports nothing heavy. If the run cannot be opened, `fail` records why: waiting trials raise it, and
`SETUP_FAILED` (read by the Tuner's stopper, tuner.py) ends the sweep, whose driver raises the error.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import ray

SETUP_FAILED = threading.Event()  # the parent run could not be opened: no trial may go on (driver process)


class SetupFailedError(RuntimeError):
    """Raised in a trial waiting on a value the driver failed to produce (its message is the driver's error)."""


@ray.remote(num_cpus=0)
class Handoff:
    """One value, set once by the driver, awaited by any number of trials (an async actor: waits cost nothing)."""

    def __init__(self) -> None:
        self._value: dict[str, Any] | None = None
        self._error: str | None = None
        self._ready = asyncio.Event()

    async def put(self, value: dict[str, Any]) -> None:
        self._value = value
        self._ready.set()

    async def fail(self, error: str) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> dict[str, Any]:
        await self._ready.wait()
        if self._error is not None:
            raise SetupFailedError(self._error)
        return self._value
