"""A sweep driver SIGKILLed after its first finished trial, then resumed (issue 23, promise 8), end to end on Ray.

`dpo sweep` of the quickstart config shortened (three betas, 12 steps each, train/loss every 2 steps) runs
as a child process with the embedded MLflow server. Once Tune records a finished trial, the test waits a
seeded random delay and SIGKILLs the driver's process group and everything below it (local Ray, MLflow
server), then runs `dpo sweep --resume`. Every trial must then have exactly one MLflow run, FINISHED (none
RUNNING), holding every logged train/loss step exactly once: the trial that was running when the driver
died lost no point (its metric journal is replayed by --resume, orchestrator/tracking/metric_journal.py)
and logged none twice. The scenario is bench/driver_kill.py's, which repeats it with more seeds; the
journal replay on its own is tested without Ray in tests/test_chaos_journal.py.
It is too slow for the suite's time budget (on 2026-12-02, on 2 cores shared with other test runs: 10 minutes
at a load average of 10 to 19 with the reference still precomputed; the script's runs with the live reference
took 149 to 576 s: Ray, the MLflow server and the trials start twice), so it runs only when asked:
`DPO_E2E_CHAOS=1 python -m pytest tests/test_chaos_driver_kill.py -q`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.integration, pytest.mark.timeout(1200),
              pytest.mark.skipif(os.environ.get("DPO_E2E_CHAOS") != "1",
                                 reason="minutes of Ray and MLflow start-up, twice: set DPO_E2E_CHAOS=1 (docs/reliability.md)")]

REPO = Path(__file__).resolve().parents[1]
SEED, STEPS, LOG_EVERY = 23, 12, 2


def load_bench():
    spec = importlib.util.spec_from_file_location("driver_kill", REPO / "bench" / "driver_kill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sweep_driver_killed_after_its_first_finished_trial_resumes_with_every_curve_complete(tmp_path, demo_cache):
    figures = load_bench().scenario(tmp_path / "sweep", SEED, steps=STEPS, log_every=LOG_EVERY, max_delay_s=4.0)
    print({key: value for key, value in figures.items() if key != "trials"})

    assert figures["driver_alive_at_kill"], f"the first sweep ended before the kill: {figures}"
    assert figures["resume_exit"] == 0, figures.get("resume_log")
    trials = figures["trials"]
    assert len(trials) == 3, trials
    for trial in trials:
        assert trial["error"] is None and trial["last_step"] == STEPS, trial
        assert trial["runs"] == 1, f"{trial['trial_id']}: {trial['runs']} MLflow runs"
        [curve] = trial["curves"]
        assert curve["status"] == "FINISHED", trial
        assert curve["missing"] == [] and curve["twice"] == 0, trial
        assert curve["points"] == figures["expected_points_per_run"], trial
    assert figures["complete"]
