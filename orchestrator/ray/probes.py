"""Optional timing probes of a sweep trial: where its time goes before the first optimizer step.

Not on the training path: the process that runs the engine (a warm trial actor or a Ray Train worker)
wraps its report callable with `StartupClock.wrap`, which adds the `perf/*` figures below to every report;
bench/sweep.py sums them into the sweep's overhead breakdown.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from orchestrator.ray.trial import WorkerJob


class StartupClock:
    """Where a trial's time goes before its first optimizer step, as `perf/*` metrics of every report.

    - perf/ray_train_start_seconds (Ray Train trials only): from the trial driver's TorchTrainer.fit() to
      train_worker starting (Ray Train's controller, worker and helper processes; the trial driver's
      clock, so one machine or synchronised clocks);
    - perf/reference_wait_seconds: waiting for the sweep's reference task (the first trials only);
    - perf/load_seconds: the rest of the time from the engine's process starting on the trial (a warm
      trial: the trial function starting) to the first report, less the first step: imports (none in a
      warm actor's later trials), data, reference cache, model loading and wrapping (DDP/FSDP), and a
      warm trial's MLflow run;
    - perf/trial_started_at: when the trial function started (seconds since the epoch), so that
      bench/sweep.py can order trials and count the time between them.
    Fixed at the first report; bench/sweep.py sums them into the sweep's overhead breakdown.
    """

    def __init__(self, fit_called_at: float | None, worker_entered_at: float, trial_started_at: float | None = None):
        self.fit_called_at = fit_called_at
        self.entered = worker_entered_at
        self.trial_started_at = trial_started_at
        self.reference_wait = 0.0
        self.figures: dict[str, float] | None = None

    @classmethod
    def of(cls, job: "WorkerJob", entered_at: float) -> "StartupClock":
        """The clock of a job's engine process that started at `entered_at`."""
        return cls(fit_called_at=job.fit_called_at, worker_entered_at=entered_at, trial_started_at=job.trial_started_at)

    @contextlib.contextmanager
    def waiting_for_reference(self):
        started = time.time()
        try:
            yield
        finally:
            self.reference_wait += time.time() - started

    def metrics(self, first_report: dict[str, Any]) -> dict[str, float]:
        if self.figures is None:
            in_steps = float(first_report.get("perf/step_seconds_total", 0.0)) + float(first_report.get("perf/eval_seconds_total", 0.0))
            self.figures = {"perf/reference_wait_seconds": self.reference_wait,
                            "perf/load_seconds": max(0.0, time.time() - self.entered - self.reference_wait - in_steps)}
            if self.fit_called_at is not None:
                self.figures["perf/ray_train_start_seconds"] = max(0.0, self.entered - self.fit_called_at)
            if self.trial_started_at is not None:
                self.figures["perf/trial_started_at"] = self.trial_started_at
        return self.figures

    def wrap(self, report: Callable[[dict[str, Any], str | None], None]) -> Callable[[dict[str, Any], str | None], None]:
        """`report` with this clock's figures added to every metrics dict."""
        def with_startup(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
            report({**metrics, **self.metrics(metrics)}, checkpoint_dir)

        return with_startup
