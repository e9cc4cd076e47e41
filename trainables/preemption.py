"""Preemption: SIGTERM or SIGINT becomes a checkpoint at the next step boundary, within a grace period.

A cluster that takes a node back (spot instances, Slurm or Kubernetes preemption) sends SIGTERM and kills
the process some seconds later; Ctrl-C sends SIGINT. While `stop_on_signals(grace_s)` is active (it is
installed by `dpo train` / `dpo sft` in the main thread, orchestrator/workflows/local_run.py):
1) the first SIGTERM or SIGINT only records the request. The training loop (trainables/loop.py) reads
   `stop_requested()` at the end of the step it is in, writes a checkpoint of that step (atomically:
   trainables/checkpointing.py), reports it and raises `Preempted`;
2) if that step and its checkpoint are not done within grace_s seconds of the signal, `PreemptionTimeout`
   is raised wherever the loop is. A checkpoint cut short stays a staging folder, which is never picked,
   so the previous checkpoint is the one to resume from;
3) a second SIGTERM or SIGINT stops at once (KeyboardInterrupt), for the same reason without harm.
Python runs signal handlers between bytecodes, so a signal that arrives inside one long C call (a big
matrix product) is seen when that call returns. Handlers can only be installed in the main thread; in any
other thread (a Ray trial's training thread) `stop_on_signals` changes nothing.
A Ray trial worker (a warm trial actor, a Ray Train worker) trains in a thread of its own, so
there the handlers are put in place once per process from its main thread (`install_in_worker`, called
when orchestrator/ray/trial.py is imported there) and only act while a trial runs (`trial_scope`): the
trial then saves and reports the step in progress and raises `Preempted`, and Ray's failure handling
retries it from that checkpoint. In a trial of several workers the signal reaches one rank; the loop's
`agreed_stop_signal` shares it at every step boundary, so every rank saves the same step and stops.
Outside a trial, on a second signal, or when the grace period runs out, the process's previous handler
(Ray's: exit) runs. No torch here.
Tested by `python -m pytest tests/test_preemption.py tests/test_chaos_trial_preemption.py tests/test_fsdp_sweep.py -q`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

from trainables.errors import UserError

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped on request with a checkpoint; run it again to go on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(UserError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint of the step it was in.

    A UserError only for its exit path: `dpo`'s main prints the message (which says how to go on) without a
    traceback and exits with EXIT_PREEMPTED instead of 2.
    """

    exit_code = EXIT_PREEMPTED

    def __init__(self, signal_name: str, step: int, max_steps: int, checkpoint: str | None,
                 in_trial: bool | None = None):
        self.signal_name, self.step, self.max_steps, self.checkpoint = signal_name, step, max_steps, checkpoint
        self.in_trial = _REQUEST.trial_scoped if in_trial is None else in_trial  # raised in a sweep's trial
        saved = (f"checkpoint {checkpoint} saved" if checkpoint  # below: a rank other than 0 of a run of several
                 else "the checkpoint of that step was saved with rank 0, which reports it")
        go_on = ("the trial is retried from it (failure.max_failures)" if self.in_trial
                 else "continue with --set train.resume_from=latest")
        super().__init__(f"training stopped by {signal_name} after step {step} of {max_steps}: {saved}; {go_on}")

    def __reduce__(self):  # pickled as its arguments: Ray sends a trial's error to the driver by pickle
        return (Preempted, (self.signal_name, self.step, self.max_steps, self.checkpoint, self.in_trial))


class PreemptionTimeout(BaseException):
    """The grace period ran out before the step in progress and its checkpoint were done.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """


class _StopRequest:
    """What the signal handler records; read by the training loop at each step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.grace_s: float | None = None
        self.in_trial = False  # a Ray worker: a trial's loop is running and will read the request
        self.trial_scoped = False  # a trial's loop runs (trial_scope), with or without the handlers installed

    def clear(self) -> None:
        self.signal_name = self.received_at = self.grace_s = None
        self.in_trial = self.trial_scoped = False


_REQUEST = _StopRequest()


def stop_requested() -> str | None:
    """The name of the signal that asked training to stop (e.g. "SIGTERM"), or None."""
    return _REQUEST.signal_name


def _on_alarm(signum, frame) -> None:
    raise PreemptionTimeout(f"the step in progress and its checkpoint did not finish within the {_REQUEST.grace_s:g} s "
                            f"grace period after {_REQUEST.signal_name}; stopped without a new checkpoint (the "
                            "previous one is intact: continue with --set train.resume_from=latest)")


def _on_stop_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _REQUEST.signal_name is not None:
        logger.warning("%s again: stopping at once, without a checkpoint of the step in progress", name)
        raise KeyboardInterrupt(f"second stop signal ({name})")
    _REQUEST.signal_name, _REQUEST.received_at = name, time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, _REQUEST.grace_s)
    logger.warning("%s: saving a checkpoint at the end of the step in progress, then stopping (grace period %g s; "
                   "send it again to stop at once)", name, _REQUEST.grace_s)


@contextlib.contextmanager
def stop_on_signals(grace_s: float) -> Iterator[bool]:
    """Turn SIGTERM / SIGINT into a stop at the next step boundary while the block runs; yields whether the
    handlers were installed (only in the main thread). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    _REQUEST.clear()
    _REQUEST.grace_s = float(grace_s)
    previous = {number: signal.getsignal(number) for number in (*STOP_SIGNALS, signal.SIGALRM)}
    for number in STOP_SIGNALS:
        signal.signal(number, _on_stop_signal)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in previous.items():
            signal.signal(number, handler)
        _REQUEST.clear()


# ---- Ray trial workers: handlers installed once per process, active while a trial runs -----------------

_WORKER_PREVIOUS: dict[int, object] = {}  # the handlers found at install_in_worker (Ray's SIGTERM: exit)


def _call_previous(signum: int, frame) -> None:
    """What the process did before install_in_worker: Ray's handler exits the worker; a default one stops it."""
    previous = _WORKER_PREVIOUS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)  # the default action, as if nothing had been installed


def _on_worker_signal(signum, frame) -> None:
    if not _REQUEST.in_trial or _REQUEST.signal_name is not None:
        _call_previous(signum, frame)  # no trial to checkpoint, or a second signal: stop at once
        return
    _on_stop_signal(signum, frame)  # records the request and arms the grace period (SIGALRM)...
    signal.signal(signal.SIGALRM, _on_worker_alarm)  # ...whose end, here, hands over to the worker's own handler


def _on_worker_alarm(signum, frame) -> None:
    logger.warning("the step in progress and its checkpoint did not finish within the %g s grace period after %s; "
                   "stopping without a new checkpoint (the trial restarts from its previous one)",
                   _REQUEST.grace_s, _REQUEST.signal_name)
    _call_previous(signal.SIGTERM, frame)


def install_in_worker() -> bool:
    """Install the trial worker's SIGTERM / SIGINT handlers in this process (idempotent); whether they are
    installed. Only the main thread can: called there by the import of orchestrator/ray/trial.py in a Ray
    worker, after Ray put in place its own SIGTERM handler (which is kept, and called when no trial runs)."""
    if threading.current_thread() is not threading.main_thread():
        return bool(_WORKER_PREVIOUS)
    if signal.getsignal(signal.SIGTERM) is _on_worker_signal:
        return True
    for number in STOP_SIGNALS:
        _WORKER_PREVIOUS[number] = signal.getsignal(number)
        signal.signal(number, _on_worker_signal)
    return True


@contextlib.contextmanager
def trial_scope(grace_s: float) -> Iterator[bool]:
    """While a trial's loop runs in this worker (any thread): a stop signal asks it to checkpoint the step in
    progress within grace_s; yields whether the worker's handlers are installed (install_in_worker)."""
    installed = signal.getsignal(signal.SIGTERM) is _on_worker_signal
    _REQUEST.clear()
    _REQUEST.grace_s, _REQUEST.in_trial, _REQUEST.trial_scoped = float(grace_s), installed, True
    try:
        yield installed
    finally:
        _REQUEST.in_trial = _REQUEST.trial_scoped = False
        if _REQUEST.signal_name is None:
            _REQUEST.clear()
        else:  # the trial stopped on the signal: no alarm now; its retry runs in another worker
            signal.setitimer(signal.ITIMER_REAL, 0)
