"""The sweep's reference pass: log-probs of every train and eval pair under the reference model,
computed once into the shared cache, while Tune starts the first trials.

A trial of one worker gets one Ray task with that worker's resources. A trial of N workers gets a
data-parallel pass over N tasks with the same resources each: every task loads the reference model, computes
one contiguous slice of the pairs and writes it as a part file beside the cache (a pass stopped half-way
keeps the parts it finished), and a coordinator task that reserves nothing joins the parts into the one cache
file the trials read. So the pass takes about 1/N of the time of one worker, on the GPUs the trials will use.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from pathlib import Path

from orchestrator.config.spec import RunSpec
from orchestrator.errors import UserError

logger = logging.getLogger(__name__)

REFERENCE_FAILED = threading.Event()  # set by ReferenceTask.watch; read by reference_stopper() in Tune's loop


class ReferenceTask:
    """The sweep's one reference pass (log-probs of every train and eval pair), as a Ray task.

    Tune starts the first trial while it runs: each trial worker waits for it (train_worker's
    `reference_ready`) before reading the cache, so Tune's start, the trial driver and Ray Train's worker
    start-up overlap the reference forward. A failure stops the sweep (reference_stopper) and is raised by
    `result`.
    """

    def __init__(self, spec: RunSpec, data_ref):
        import ray

        self.cache_dir = spec.preference.reference_cache_dir
        self.workers = max(1, spec.resources.num_workers)
        if self.workers == 1:
            self.ref = ray.remote(_compute_reference).options(**worker_options(spec)).remote(spec, data_ref)
        else:  # [data_ref]: a ref in a list reaches the coordinator unresolved, to hand on to the part tasks
            self.ref = ray.remote(_data_parallel_reference).options(num_cpus=0).remote(spec, [data_ref])
        REFERENCE_FAILED.clear()

    def watch(self) -> None:
        """In a background thread: wait for the task; log its cache key, or flag its failure (REFERENCE_FAILED)."""
        import ray

        def wait() -> None:
            try:
                key, reused, _ = ray.get(self.ref)
            except Exception:  # noqa: BLE001 - `result` raises it in the driver
                REFERENCE_FAILED.set()
                return
            logger.info("reference log-probs %s (cache key %s) in %s", "reused" if reused else "computed", key, self.cache_dir)

        threading.Thread(target=wait, name="reference-task", daemon=True).start()

    def result(self) -> str:
        """The cache key (waits; raises the task's error)."""
        import ray

        return ray.get(self.ref)[0]


class ReferenceWaitTimeout(UserError):
    """The reference pass did not end within reference.wait_timeout_s."""


def wait_for_reference(ref, timeout_s: float, who: str, log_every_s: float = 60.0) -> None:
    """Wait for the reference pass (raising its error), logging every `log_every_s`; ReferenceWaitTimeout
    after `timeout_s`, naming the key to raise (a 70B pass over a large data set can take hours)."""
    import ray

    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        ready, _ = ray.wait([ref], timeout=max(0.0, min(log_every_s, timeout_s - waited)))
        if ready:
            ray.get(ref)
            return
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise ReferenceWaitTimeout(
                f"{who} waited {waited:.0f} s for the sweep's reference pass, which has not ended; raise "
                "reference.wait_timeout_s if the pass is slow (its progress is in the sweep's console.log), "
                "or check that the cluster can place it (it needs the resources of one trial worker)")
        logger.info("%s: waiting for the reference pass (%.0f s so far, at most %.0f s)", who, waited, timeout_s)


class DriverReference:
    """The pass computed by the driver itself, in a thread, while Ray, MLflow and Tune start: used on a local
    Ray without GPUs, where the driver has torch and the pairs loaded already and no Ray worker process has
    to import them for a separate task (on 2 cores that start-up alone took seconds per sweep).

    The cache key is hashed first (`key()`, handed to the trials); the pass then holds the cache file's lock,
    so a trial that starts before it ends waits on the lock and reads the file (trainables/reference_cache.py).
    A failure stops the sweep like a failed reference task (REFERENCE_FAILED) and is raised by `result`.
    """

    def __init__(self, spec: RunSpec, data):
        self.cache_dir, self.ref = spec.preference.reference_cache_dir, None
        self._key: concurrent.futures.Future = concurrent.futures.Future()
        self._done, self._error = threading.Event(), None
        REFERENCE_FAILED.clear()
        threading.Thread(target=self._run, args=(spec, data), name="reference-pass", daemon=True).start()

    def _run(self, spec: RunSpec, data) -> None:
        from trainables.entrypoints import precompute_reference, reference_cache_key

        try:
            key = reference_cache_key(spec.model, spec.preference, data, spec.runtime)
            self._key.set_result(key)
            *_, reused = precompute_reference(spec.model, spec.preference, data, spec.runtime, key=key)
            logger.info("reference log-probs %s (cache key %s) in %s", "reused" if reused else "computed", key,
                        self.cache_dir)
        except BaseException as error:  # noqa: BLE001 - raised in the driver by key() or result()
            self._error = error
            if not self._key.done():
                self._key.set_exception(error)
            REFERENCE_FAILED.set()
        finally:
            self._done.set()

    def key(self) -> str:
        """The cache key (waits for the hash; raises the pass's error if it failed first)."""
        return self._key.result()

    def watch(self) -> None:
        """Nothing to do: the thread flags its own failure."""

    def result(self) -> str:
        """The cache key once the pass has ended (raises its error)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._key.result()


def reference_stopper():
    """A Tune Stopper that ends the sweep once the reference task has failed (every trial would wait on it),
    or the sweep's MLflow parent run could not be opened (handoff.py: every trial would fail on it).

    Stateless, so it pickles into the Tuner's state and works again after Tuner.restore.
    """
    from ray.tune import Stopper

    class ReferenceFailed(Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            from orchestrator.ray import handoff, reference_task

            return reference_task.REFERENCE_FAILED.is_set() or handoff.SETUP_FAILED.is_set()

    return ReferenceFailed()




def _compute_reference(spec: RunSpec, data) -> tuple[str, bool, int]:
    """The Ray task: (cache key, reused, processes that computed) of the reference log-probs of `data` under
    spec's reference model."""
    from trainables.entrypoints import precompute_reference

    _set_threads(spec)
    _, _, key, reused = precompute_reference(spec.model, spec.preference, data, spec.runtime)
    return key, reused, 0 if reused else 1


def worker_options(spec: RunSpec) -> dict[str, float]:
    """What one reference worker asks Ray for: the resources of one of the trial's workers."""
    resources = spec.resources
    return {"num_cpus": resources.cpus_per_worker} | ({"num_gpus": resources.gpus_per_worker} if resources.use_gpu else {})


def _set_threads(spec: RunSpec) -> None:
    import torch

    if not spec.resources.use_gpu:
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))  # Ray pins the task to these CPUs


def _reference_part(spec: RunSpec, data, key: str, index: int, count: int):
    """One worker of the data-parallel pass: (values of slice `index` of `count`, reused from its part file,
    this worker's process id)."""
    from trainables.entrypoints import reference_part

    _set_threads(spec)
    return *reference_part(spec.model, spec.preference, data, spec.runtime, key, index, count), os.getpid()


def _data_parallel_reference(spec: RunSpec, data_refs: list) -> tuple[str, bool, int]:
    """The coordinator of the data-parallel pass: (cache key, reused, worker processes that ran parts). Holds
    the cache's lock while the part tasks run, so trials that find the cache missing wait for this pass
    instead of starting their own."""
    import ray

    from trainables.entrypoints import precompute_reference
    from trainables.reference_cache import concat_reference_logps, remove_parts

    data_ref = data_refs[0]
    data, count = ray.get(data_ref), max(1, spec.resources.num_workers)
    workers: set[int] = set()

    def compute(key: str):
        part = ray.remote(_reference_part).options(**worker_options(spec))
        results = ray.get([part.remote(spec, data_ref, key, index, count) for index in range(count)])
        workers.update(pid for _, _, pid in results)
        logger.info("reference pass: %d parts (%d reused from an earlier pass)", count, sum(r for _, r, _ in results))
        return concat_reference_logps([values for values, _, _ in results])

    _, _, key, reused = precompute_reference(spec.model, spec.preference, data, spec.runtime, compute_values=compute)
    remove_parts(Path(spec.preference.reference_cache_dir).expanduser(), key)
    return key, reused, len(workers)
