"""Reliability (issue 7, item 7; issue 4): the MLflow server is down for 30 s in the middle of a training run.

The engine trains in this process and reports through the same TrialTracker, with the same defaults, that
rank 0 of a Ray Train worker uses (orchestrator/ray/trial.py). The test stops the real `mlflow server` (on
127.0.0.1, SQLite backend in pytest's tmp folder) at step 10, keeps it down for 30 s while training goes
on, then starts it again on the same port and the same backend store. Training must never wait on the
server, at least 99% of the metric points must reach the run, and the outage must be logged and recorded
in the run as `tracking/outage_seconds`. A Ray version: `python bench/reliability_outage.py`.
Run: `python -m pytest tests/test_reliability_mlflow.py -q --durations=5` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.tracking import records as tracking
from orchestrator.tracking.schema import DROPPED_METRIC, OUTAGE_METRIC
from orchestrator.tracking.server import EmbeddedServer
from orchestrator.tracking.trial_tracker import TrialTracker
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.entrypoints import run_dpo

OUTAGE_S = 30.0
MAX_STEPS = 100
DOWN_AT_STEP = 10  # the server is stopped right after this step's report
LAST_STEPS_AFTER_OUTAGE = 10  # these steps wait for the server to be back: the outage lies inside the training
STEP_PACE_S = 0.25  # at least this long per step, as a larger model would take: training spans the outage

pytestmark = [pytest.mark.mlflow, pytest.mark.integration]


@pytest.fixture
def world(tmp_path) -> dict[str, str]:
    model_dir = build_model_dir(tmp_path / "model", "llama")
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows("explicit", 32, seed=1))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", pair_rows("explicit", 8, seed=2))
    return {"root": str(tmp_path), "model": str(model_dir), "train": str(train), "eval": str(eval_)}


@pytest.fixture
def server(tmp_path):
    embedded = EmbeddedServer(tmp_path / "mlflow")
    url = embedded.start_or_reuse()
    try:
        yield embedded, url
    finally:
        embedded.stop()


class Outage:
    """Stops the server when asked, and starts it again OUTAGE_S later on the same port and database."""

    def __init__(self, embedded: EmbeddedServer, url: str):
        self.embedded, self.url = embedded, url
        self.port = int(url.rsplit(":", 1)[1])
        self.down_at: float | None = None
        self.up_at: float | None = None
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._come_back, daemon=True)

    def begin(self) -> None:
        assert self.embedded.stop(), "the server was not running"
        self.down_at = time.monotonic()
        self._thread.start()

    def _come_back(self) -> None:
        try:
            time.sleep(OUTAGE_S)  # the fault itself: 30 s without a server
            assert self.embedded.start_or_reuse(port=self.port, timeout_s=300) == self.url
            self.up_at = time.monotonic()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.failure = error

    def wait_until_over(self, timeout_s: float = 400) -> None:
        self._thread.join(timeout_s)
        assert self.failure is None, f"the server did not come back: {self.failure}"
        assert self.up_at is not None, "the server was never started again"


def test_a_30_second_server_outage_mid_training_loses_no_metric_points_and_is_logged(world, server, caplog):
    embedded, url = server
    client = tracking.client_for(url)
    experiment_id, parent = tracking.start_parent_run(url, "outage", "outage", {"dpo": {"beta": 0.1}})
    run_id = tracking.find_or_create_trial_run(url, experiment_id, parent, "trial-1", "outage", {"beta": 0.1})
    tracker = TrialTracker(url, run_id)  # the defaults rank 0 of a Train worker uses
    outage = Outage(embedded, url)
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking.trial_tracker")
    logged: dict[str, int] = {}
    reports: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:  # what train_worker's report does
        started = time.perf_counter()
        values = {key: value for key, value in metrics.items() if key != "step"}
        tracker.log_metrics(values, step=int(metrics["step"]))
        reports.append({"step": metrics["step"], "at": time.monotonic(), "log_seconds": time.perf_counter() - started})
        for key in values:
            logged[key] = logged.get(key, 0) + 1
        if metrics["step"] == DOWN_AT_STEP:
            outage.begin()
        if metrics["step"] == MAX_STEPS - LAST_STEPS_AFTER_OUTAGE:
            outage.wait_until_over()
        time.sleep(STEP_PACE_S)

    spec = engine_args(world["model"], world["train"], world["eval"],
                       reference_cache=Path(world["root"]) / "reference-cache",
                       output_dir=Path(world["root"]) / "outputs", data__max_length=48, dpo__beta=0.1,
                       train__device="cpu", train__learning_rate=5e-3, train__batch_size=8, train__micro_batch_size=8,
                       train__max_steps=MAX_STEPS, train__warmup_steps=0, train__schedule="cosine",
                       train__weight_decay=0.0, train__max_grad_norm=1.0, train__eval_every=25,
                       train__checkpoint_every=50, train__keep_checkpoints=1, train__log_every=1, train__seed=0)
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, report)
    outage.wait_until_over()
    assert tracker.close(timeout_s=120) is True
    tracking.end_run(url, run_id, "FINISHED")

    during = [r for r in reports if outage.down_at < r["at"] < outage.up_at]
    print(f"{len(during)} of {MAX_STEPS} steps reported while the server was down "
          f"({outage.up_at - outage.down_at:.1f} s, restart included); slowest log_metrics "
          f"{max(r['log_seconds'] for r in reports) * 1000:.1f} ms")
    assert [r["step"] for r in reports] == list(range(1, MAX_STEPS + 1))  # training went on to the end
    assert len(during) >= 10 and [r["step"] for r in during] == list(range(DOWN_AT_STEP + 1, DOWN_AT_STEP + 1 + len(during)))
    assert max(r["log_seconds"] for r in reports) < 0.5  # the loop never waited on the server

    arrived = {key: len(client.get_metric_history(run_id, key)) for key in logged}
    print(f"metric points arrived: {sum(arrived.values())} of {sum(logged.values())}")
    assert sum(arrived.values()) >= 0.99 * sum(logged.values()), {k: (arrived[k], logged[k]) for k in logged}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[DROPPED_METRIC] == sum(logged.values()) - sum(arrived.values())

    [gap] = [point.value for point in client.get_metric_history(run_id, OUTAGE_METRIC)]
    print(f"outage recorded by the tracker: {gap:.1f} s")
    assert OUTAGE_S - 5 <= gap <= (outage.up_at - outage.down_at) + 15, gap
    warnings = [record.getMessage() for record in caplog.records]
    assert any(f"MLflow server {url} unreachable" in message for message in warnings), warnings
    back = [message for message in warnings if "is back after" in message]
    assert len(back) == 1 and float(re.search(r"back after ([\d.]+) s", back[0]).group(1)) == pytest.approx(gap, abs=0.1)
