"""The sweep's reference pass: log-probs of every train and eval pair under the reference model,
computed once as a Ray task into the shared cache, while Tune starts the first trials.
"""

from __future__ import annotations

import logging
import threading

from orchestrator.config.spec import RunSpec

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

        resources = spec.resources
        options = {"num_cpus": resources.cpus_per_worker} | ({"num_gpus": 1} if resources.use_gpu else {})
        self.cache_dir = spec.preference.reference_cache_dir
        self.ref = ray.remote(_compute_reference).options(**options).remote(spec, data_ref)
        REFERENCE_FAILED.clear()

    def watch(self) -> None:
        """In a background thread: wait for the task; log its cache key, or flag its failure (REFERENCE_FAILED)."""
        import ray

        def wait() -> None:
            try:
                key, reused = ray.get(self.ref)
            except Exception:  # noqa: BLE001 - `result` raises it in the driver
                REFERENCE_FAILED.set()
                return
            logger.info("reference log-probs %s (cache key %s) in %s", "reused" if reused else "computed", key, self.cache_dir)

        threading.Thread(target=wait, name="reference-task", daemon=True).start()

    def result(self) -> str:
        """The cache key (waits; raises the task's error)."""
        import ray

        return ray.get(self.ref)[0]


def reference_stopper():
    """A Tune Stopper that ends the sweep once the reference task has failed (every trial would wait on it).

    Stateless, so it pickles into the Tuner's state and works again after Tuner.restore.
    """
    from ray.tune import Stopper

    class ReferenceFailed(Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            from orchestrator.ray import reference_task

            return reference_task.REFERENCE_FAILED.is_set()

    return ReferenceFailed()




def _compute_reference(spec: RunSpec, data) -> tuple[str, bool]:
    """The Ray task: (cache key, reused) of the reference log-probs of `data` under spec's reference model."""
    import torch

    from trainables.entrypoints import precompute_reference

    if not spec.resources.use_gpu:
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))  # Ray pins the task to these CPUs
    _, _, key, reused = precompute_reference(spec.model, spec.preference, data, spec.runtime)
    return key, reused
