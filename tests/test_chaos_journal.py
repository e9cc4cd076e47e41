"""No lost metric points when a trial's process is killed (issue 23, promise 8): the metric journal.

Several child processes each log a trial's curves through a journaled TrialTracker (the MLflow buffer
flushing every 0.3 s, so points are always waiting in memory) and are SIGKILLed at seeded random moments;
then the journals are replayed as a resumed sweep's driver does (`replay_journals`). Every run must then
hold every point its process logged, each step exactly once, with no gap. The store is MLflow's SQL store
through a sqlite URI (the tracker's HTTP path to a server differs only in transport; the server keeps the
same SQL store). Run: `python -m pytest tests/test_chaos_journal.py -q` (about 20-30 s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.tracking.metric_journal import journal_path, replay_journals, unacknowledged

REPO = Path(__file__).resolve().parents[1]
KEYS = ("train/loss", "train/reward_margin")
REPETITIONS = 4
SEED = 23

# One trial's metric stream: a point of each key per step, a step every 4 ms, until it is killed.
LOGGING_TRIAL = r"""
import json, sys, time
from orchestrator.tracking.trial_tracker import TrialTracker

uri, run_id, journal = sys.argv[1:4]
tracker = TrialTracker(uri, run_id, flush_every_s=0.3, journal=journal)
tracker.log_metrics({"train/loss": 1.0, "train/reward_margin": 0.01}, step=1)
while tracker.delivered_points < 2:  # the sender is up (mlflow imported, store open): kills now hit a live stream
    time.sleep(0.01)
print("ready", flush=True)
for step in range(2, 100_000):
    tracker.log_metrics({"train/loss": 1.0 / step, "train/reward_margin": 0.01 * step}, step=step)
    time.sleep(0.004)
"""


@pytest.mark.mlflow
@pytest.mark.integration
def test_trials_killed_at_random_moments_lose_no_metric_point_once_their_journals_are_replayed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("chaos-journal")
    runs = [client.create_run(experiment).info.run_id for _ in range(REPETITIONS)]
    journals = tmp_path / "metric_journal"
    rng = random.Random(SEED)
    kill_after = [round(rng.uniform(0.2, 2.5), 2) for _ in runs]  # seconds after the tracker is ready

    children = [subprocess.Popen([sys.executable, "-c", LOGGING_TRIAL, uri, run_id, str(journal_path(journals, run_id))],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}) for run_id in runs]
    for child in children:
        assert child.stdout.readline().strip() == "ready", child.communicate()[1][-3000:]
    ready_at = time.monotonic()
    for child, moment in sorted(zip(children, kill_after), key=lambda pair: pair[1]):
        time.sleep(max(0.0, ready_at + moment - time.monotonic()))
        child.send_signal(signal.SIGKILL)
    for child in children:
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL

    def history(run_id: str) -> dict[str, list[int]]:
        return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in KEYS}

    journaled = {run_id: _journaled_steps(journal_path(journals, run_id)) for run_id in runs}
    before = {run_id: history(run_id) for run_id in runs}
    pending = unacknowledged(journals)
    missing_before = {run_id: sum(len(journaled[run_id][key]) - len(before[run_id][key]) for key in KEYS) for run_id in runs}
    assert all(missing_before[run_id] >= 0 for run_id in runs)
    assert sum(missing_before.values()) > 0, "no kill caught points in the buffer: the test would not show a loss"

    sent = replay_journals(uri, journals, timeout_s=60)

    for run_id, moment in zip(runs, kill_after):
        steps = journaled[run_id]
        last = max(steps[KEYS[0]])
        after = history(run_id)
        print(f"killed {moment:.2f} s in: {last} steps logged, {missing_before[run_id]} points missing in MLflow "
              f"before the replay ({pending[run_id]} unacknowledged), {sent.get(run_id, 0)} replayed")
        for key in KEYS:
            # the journal holds every step the process logged (a step's points are written in one call)
            assert steps[key] == list(range(1, len(steps[key]) + 1)), (key, steps[key][-5:])
            assert after[key] == steps[key], (key, len(after[key]), len(steps[key]))  # complete, no step twice
        assert len(steps[KEYS[0]]) >= last - 1
    assert unacknowledged(journals) == {run_id: 0 for run_id in runs}
    assert replay_journals(uri, journals) == {}  # nothing left: a second resume sends nothing


def _journaled_steps(path: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {key: [] for key in KEYS}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        steps[record["k"]].append(record["t"])
    return {key: sorted(values) for key, values in steps.items()}


def test_a_journal_sends_again_only_what_was_not_acknowledged(tmp_path):
    """Unit level, with a fake client: acknowledged points are never sent again, the rest are, once."""
    from orchestrator.tracking.trial_tracker import TrialTracker

    class Client:
        def __init__(self, fail: bool = False):
            self.fail, self.batches = fail, []

        def log_batch(self, run_id, metrics):
            if self.fail:
                raise ConnectionError("server down")
            self.batches.append([(m.key, m.step, m.value, m.timestamp) for m in metrics])

    path = journal_path(tmp_path, "run-1")
    first = Client()
    tracker = TrialTracker("sqlite:///unused.db", "run-1", client=first, journal=path, flush_every_s=0.05,
                           report_drops=False)
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    assert tracker.close(timeout_s=10)
    assert [point[:3] for batch in first.batches for point in batch] == [("train/loss", 1, 0.5)]

    down = Client(fail=True)  # a process whose server never answers before it dies
    tracker = TrialTracker("sqlite:///unused.db", "run-1", client=down, journal=path, flush_every_s=0.05,
                           max_backoff_s=0.05, report_drops=False)
    tracker.log_metrics({"train/loss": 0.25}, step=2)
    tracker.log_metrics({"train/loss": 0.125}, step=3)
    assert not tracker.close(timeout_s=0.3)
    assert unacknowledged(tmp_path) == {"run-1": 2}

    again = Client()
    tracker = TrialTracker("sqlite:///unused.db", "run-1", client=again, journal=path, flush_every_s=0.05,
                           report_drops=False)
    assert tracker.close(timeout_s=10)
    sent = [point for batch in again.batches for point in batch]
    assert [point[:3] for point in sent] == [("train/loss", 2, 0.25), ("train/loss", 3, 0.125)]
    assert unacknowledged(tmp_path) == {"run-1": 0}

    # a retried trial trains steps 3 and 4 again from its checkpoint of step 2: step 3 is not logged twice
    retried = Client()
    tracker = TrialTracker("sqlite:///unused.db", "run-1", client=retried, journal=path, flush_every_s=0.05,
                           report_drops=False)
    tracker.log_metrics({"train/loss": 0.125}, step=3)
    tracker.log_metrics({"train/loss": 0.0625, "train/kl": 0.5}, step=4)
    tracker.log_metrics({"train/kl": 0.5}, step=4)
    assert tracker.close(timeout_s=10)
    assert [point[:3] for batch in retried.batches for point in batch] == [("train/loss", 4, 0.0625), ("train/kl", 4, 0.5)]
