"""Preemption of a sweep's trial worker (issue 23, promise 2): SIGTERM checkpoints the step in progress.

`dpo train` saves the step in progress on SIGTERM (tests/test_preemption.py); a sweep's trial trains in a
thread of a Ray worker, where the same handling is installed by orchestrator/ray/trial.py and
trainables/preemption.py. One warm trial (one worker, `failure.max_failures: 1`) of a sweep run through
`run_sweep` on a local Ray, as `dpo sweep` does; checkpoints every 10 steps, so a stop checkpoint is told
apart from a regular one. The test freezes the trial actor once Tune has its step 3 (or a later one),
sends it SIGTERM and lets it go on: the trial must save and report the step it is in (not a multiple of
10) and end its attempt with Preempted, the worker process must exit, and Tune must retry the trial from
that checkpoint (no step trained twice) and end with the losses of the same run uninterrupted in this
process (1e-6 on CPU).
Run: `python -m pytest tests/test_chaos_trial_preemption.py -q` (98 s on 2 cores shared with other runs, load average 9).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.config import ExperimentConfig
from orchestrator.config.spec import resolve_experiment
from tests.test_chaos_node_loss import assert_as_if_uninterrupted, sweep_config
from tests.test_reliability_ray import tune_results

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.timeout(400)]

CHECKPOINT_EVERY, MAX_STEPS = 10, 30  # equality within the node-loss test's TOLERANCE (1e-6)


def trial_actor() -> psutil.Process | None:
    """The warm trial actor of this test's local Ray (ray::ImplicitFunc..., a descendant of this process)."""
    for process in psutil.Process().children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(process.cmdline()):
                return process
        except psutil.Error:
            continue
    return None


def test_sigterm_to_a_trial_worker_checkpoints_the_step_in_progress_and_the_retry_goes_on_from_it(tmp_path, monkeypatch):
    from orchestrator.workflows.sweep import run_sweep

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    raw = sweep_config(tmp_path)
    raw["name"] = "trial-preemption"
    raw["train"] = {**raw["train"], "checkpoint_every": CHECKPOINT_EVERY, "max_steps": MAX_STEPS,
                    "preemption_grace_s": 30}
    experiment = resolve_experiment(ExperimentConfig.model_validate(raw))
    tune_root = Path(raw["storage_path"]) / raw["name"]
    events: dict[str, Any] = {}

    def preempt_after_step_3() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            trials = [path.parent for path in tune_root.glob("*/params.json")]
            results = tune_results(trials[0]) if trials else []
            actor = trial_actor()
            if actor is not None and results and results[-1]["step"] >= 3:
                actor.suspend()  # the signal lands mid-trial however fast the steps are
                events["signalled_after"] = [r["step"] for r in tune_results(trials[0])][-1]
                os.kill(actor.pid, signal.SIGTERM)
                actor.resume()
                events["signalled_at"] = time.monotonic()
                try:
                    actor.wait(timeout=120)
                    events["exited_after_s"] = time.monotonic() - events["signalled_at"]
                except psutil.TimeoutExpired:
                    pass
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=preempt_after_step_3, daemon=True)
    watcher.start()
    started = time.monotonic()
    summary = run_sweep(experiment)  # starts and stops its own local Ray, Tune in the main thread
    watcher.join(timeout=130)
    [trial_dir] = [path.parent for path in tune_root.glob("*/params.json")]
    results = tune_results(trial_dir)
    steps = [r["step"] for r in results]
    print(f"sweep with a preempted trial: {time.monotonic() - started:.0f} s; {events}; steps {steps}")
    errors = [path.read_text() for path in trial_dir.rglob("error*.txt")]
    # the first attempt ended with the engine's own Preempted (pickled to the driver), which Tune retried
    assert any("Preempted: training stopped by SIGTERM after step" in text for text in errors), errors

    assert "signalled_at" in events, f"the trial never reached step 3 with its actor found: {steps}"
    assert "exited_after_s" in events, "the trial worker did not exit after SIGTERM"
    # steps 1..k in the preempted worker, then the retry from its stop checkpoint: a step that is no multiple of
    # CHECKPOINT_EVERY, at or after the signal (Tune may drop the preempted worker's last results from result.json,
    # as it does for a killed one; the MLflow run gets them from the worker itself)
    restart = next(i for i, r in enumerate(results) if i and r["iterations_since_restore"] == 1)
    stopped_at = steps[restart] - 1
    assert stopped_at % CHECKPOINT_EVERY and events["signalled_after"] <= stopped_at < MAX_STEPS, steps
    assert steps[:restart] == list(range(1, steps[restart - 1] + 1)) and steps[restart - 1] <= stopped_at, steps
    assert steps[restart:] == list(range(stopped_at + 1, MAX_STEPS + 1)), steps
    assert any(f"after step {stopped_at} of {MAX_STEPS}" in text for text in errors), errors
    [trial] = summary["trials"]
    assert trial["error"] is None and trial["step"] == MAX_STEPS, trial

    assert_as_if_uninterrupted(results, raw, tmp_path / "uninterrupted", "after preemption")
