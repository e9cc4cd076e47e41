"""Asynchronous, batched step metrics of one trial's MLflow run: the training loop never waits on the server.

`TrialTracker.log_metrics` only appends to an in-memory buffer; a daemon thread sends the buffer as
MLflow log-batch calls (up to 1000 points each) every `flush_every_s` seconds or as soon as a full batch
is waiting. When the server is down the points stay buffered and are retried with backoff (at most
`max_backoff_s` apart, so a server that comes back is found within seconds; the buffer is bounded by
`max_buffer`; on overflow the oldest points are dropped and counted). The outage is logged when it starts
and when it ends, and recorded in the run as the metric `tracking/outage_seconds` (one point per outage);
lost points are logged and recorded as `tracking/dropped_points` (both names from
orchestrator/tracking/schema.py). Log lines show the URI with any password redacted. `close()` flushes
(bounded by a timeout); the run's status is set by whoever owns the run (records.end_run in run_trial).
With `journal` (a file path) every point is also written to a durable local journal the moment it is
logged, and points a killed process never got acknowledged are sent again by the next tracker on that
journal (metric_journal.py).
Rank 0 of a Ray Train worker owns one tracker; trainables never import mlflow.
Tests: `python -m pytest tests/test_tracking.py -m mlflow -q`.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.tracking.metric_journal import MetricJournal
from orchestrator.tracking.records import clean_key, client_for, redact
from orchestrator.tracking.schema import DROPPED_METRIC, OUTAGE_METRIC

logger = logging.getLogger(__name__)

POINTS_PER_CALL = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
# MLflow error codes that no retry can fix: the batch is dropped (and counted) instead of blocking the queue.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"}


@dataclass
class _Point:
    key: str
    value: float
    step: int
    timestamp_ms: int
    seq: int | None = None  # its number in the run's metric journal (None: not journaled)


class TrialTracker:
    """Buffered, background logging of step metrics to one existing MLflow run."""

    def __init__(self, uri: str, run_id: str, *, flush_every_s: float = 2.0, max_buffer: int = 100_000,
                 max_backoff_s: float = 5.0, request_timeout_s: float = 30.0, client=None,
                 journal: str | Path | None = None, report_drops: bool = True) -> None:
        self.uri, self.run_id = uri, run_id
        self._shown_uri = str(redact(uri))  # for log lines: never a password
        self.flush_every_s, self.max_buffer, self.max_backoff_s = flush_every_s, max_buffer, max_backoff_s
        self.request_timeout_s = request_timeout_s
        self._http = uri.startswith(("http://", "https://"))
        self._given_client = client  # else made on first use: importing mlflow takes ~1 s, kept off the trial's start
        self._client_lock = threading.Lock()
        self._buffer: collections.deque[_Point] = collections.deque()
        self._inflight: list[_Point] = []  # taken from the buffer, not yet acknowledged by the server
        self._condition = threading.Condition()
        self._closing = False
        self.delivered_points = 0
        self.dropped_points = 0
        self.outages: list[float] = []  # seconds of each server outage this tracker lived through
        self._dropped_reported = 0
        self._last_step = 0
        self._failing_since: float | None = None
        self._report_drops = report_drops  # False when only replaying a journal: the run's own tracker reported
        self._journal = MetricJournal(journal) if journal is not None else None
        if self._journal is not None and self._journal.pending:  # a killed process's points, sent first
            self._buffer.extend(_Point(p["key"], p["value"], p["step"], p["timestamp_ms"], p["seq"])
                                for p in self._journal.pending)
            self._last_step = max(p["step"] for p in self._journal.pending)
            logger.info("MLflow run %s: %d metric points journaled but never acknowledged are sent again (%s)",
                        run_id, len(self._journal.pending), self._journal.path)
        self._thread = threading.Thread(target=self._run, name=f"mlflow-tracker-{run_id[:8]}", daemon=True)
        self._thread.start()
        atexit.register(self.close, 10.0)

    @property
    def _client(self):
        with self._client_lock:
            if self._given_client is None:
                self._given_client = client_for(self.uri)
            return self._given_client

    # ---- called by the training loop (never blocks on the network) ----------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue every numeric value of `metrics` at `step` (strings, bools and None are skipped)."""
        now = int(time.time() * 1000)
        points = [_Point(clean_key(key), float(value), int(step), now) for key, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if not points:
            return
        with self._condition:
            if self._closing:
                logger.warning("TrialTracker for run %s is closed; %d points ignored", self.run_id, len(points))
                return
            self._last_step = max(self._last_step, int(step))
            if self._journal is not None:
                # a retried trial trains the steps after its last checkpoint again: each (key, step) is kept once
                points = [p for p in points if (p.key, p.step) not in self._journal.logged]
                self._journal.logged.update((p.key, p.step) for p in points)
                self._journal.append(points)  # on disk before this call returns: a kill after it loses nothing
            self._buffer.extend(points)
            overflow = len(self._buffer) + len(self._inflight) - self.max_buffer
            for _ in range(max(0, overflow)):
                self._buffer.popleft()
            self.dropped_points += max(0, overflow)
            if len(self._buffer) >= POINTS_PER_CALL:
                self._condition.notify_all()

    @property
    def pending_points(self) -> int:
        with self._condition:
            return len(self._buffer) + len(self._inflight)

    # ---- shutdown -------------------------------------------------------------------------------

    def close(self, timeout_s: float = 60.0) -> bool:
        """Flush what is buffered (waiting at most timeout_s) and stop the thread; True if everything was sent.

        Points still unsent at the deadline are counted in dropped_points; the thread keeps trying until the
        process exits. Called at interpreter exit too (10 s), so a worker that forgets it loses nothing.
        """
        with self._condition:
            if self._closing and not self._thread.is_alive():
                return self.pending_points == 0
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout_s)
        atexit.unregister(self.close)
        if self._journal is not None and not self._thread.is_alive():
            self._journal.close()
        if self._thread.is_alive():
            with self._condition:
                lost = len(self._buffer) + len(self._inflight)
            logger.warning("MLflow run %s: %d metric points not delivered within %.0f s of closing (server %s down?)",
                           self.run_id, lost, timeout_s, self._shown_uri)
            self.dropped_points += lost
            return False
        return True

    # ---- background thread ----------------------------------------------------------------------

    def _take_batch(self) -> list[_Point]:
        with self._condition:
            if not self._inflight:
                count = min(POINTS_PER_CALL, len(self._buffer))
                self._inflight = [self._buffer.popleft() for _ in range(count)]
            return list(self._inflight)

    def _send(self, points: list[_Point]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points]
        extra = []
        if self.dropped_points > self._dropped_reported:
            extra = [Metric(DROPPED_METRIC, float(self.dropped_points), int(time.time() * 1000), self._last_step)]
        self._post_batch(metrics + extra)
        if extra:
            logger.warning("MLflow run %s: %d metric points were dropped (buffer of %d full during a server outage)",
                           self.run_id, self.dropped_points, self.max_buffer)
            self._dropped_reported = self.dropped_points

    def _post_batch(self, metrics: list) -> None:
        """One log-batch request. Over HTTP it is sent once, with a timeout, without MlflowClient's own
        7 retries (minutes of exponential backoff that would hide the server's return and stall close()):
        the same request body and credentials MlflowClient uses, retried by _run's loop instead."""
        if not self._http:
            self._client.log_batch(self.run_id, metrics=metrics)
            return
        import json

        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/api/2.0/mlflow/runs/log-batch"
        body = message_to_json(LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in metrics]))
        response = http_request(get_default_host_creds(self.uri), endpoint, "POST", json=json.loads(body),
                                max_retries=0, timeout=self.request_timeout_s)
        verify_rest_response(response, endpoint)

    def _run(self) -> None:
        failures = 0
        try:  # mlflow's imports happen here, while the trial loads its model, not before the trial starts
            import mlflow.entities  # noqa: F401

            if not self._http:
                self._client  # noqa: B018 - creates it
        except Exception as error:  # noqa: BLE001 - _send reports the same error again, with retries
            logger.warning("MLflow client for run %s not ready: %s", self.run_id, redact(str(error)))
        while True:
            with self._condition:
                if not self._closing and len(self._buffer) < POINTS_PER_CALL and not self._inflight:
                    self._condition.wait(self.flush_every_s)
                nothing_left = not self._buffer and not self._inflight
                closing = self._closing
            if nothing_left:
                if closing:
                    self._report_final_drops()  # outside the lock: log_metrics must never wait on the network
                    return
                continue
            points = self._take_batch()
            try:
                self._send(points)
            except Exception as error:  # noqa: BLE001 - the trial must survive any tracking failure
                code = getattr(error, "error_code", None)
                if code in PERMANENT_ERRORS:
                    logger.warning("MLflow run %s rejected %d points (%s): %s; dropped", self.run_id, len(points), code,
                                   redact(str(error)))
                    with self._condition:
                        self.dropped_points += len(points)
                        self._inflight = []
                    self._acknowledge()
                    continue
                failures += 1  # the points stay in flight and are sent again
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logger.warning("MLflow server %s unreachable (%s); buffering metrics of run %s from step %d",
                                   self._shown_uri, redact(str(error)), self.run_id, self._last_step)
                time.sleep(min(self.max_backoff_s, 0.5 * 2 ** min(failures, 8)))
                continue
            with self._condition:
                self.delivered_points += len(points)
                self._inflight = []
            self._acknowledge()
            if self._failing_since is not None:
                self._record_outage(time.monotonic() - self._failing_since)
                self._failing_since, failures = None, 0

    def _acknowledge(self) -> None:
        """Tell the journal how far every point is delivered or given up (dropped ones are not sent again)."""
        if self._journal is None:
            return
        with self._condition:
            waiting = (p.seq for p in (*self._inflight, *self._buffer) if p.seq is not None)
            through = next(waiting, self._journal.next_seq) - 1
        self._journal.acknowledge(through)

    def _record_outage(self, seconds: float) -> None:
        """The server answers again: log the gap and queue it as a `tracking/outage_seconds` point."""
        self.outages.append(seconds)
        with self._condition:
            pending = len(self._buffer)
            self._buffer.append(_Point(OUTAGE_METRIC, seconds, self._last_step, int(time.time() * 1000)))
        logger.warning("MLflow server %s is back after %.1f s unreachable; run %s delivering %d buffered metric points "
                       "(%d dropped so far)", self._shown_uri, seconds, self.run_id, pending, self.dropped_points)

    def _report_final_drops(self) -> None:
        """At close: record tracking/dropped_points (0 when nothing was lost) so every run shows it."""
        from mlflow.entities import Metric

        if not self._report_drops:
            return
        try:
            self._post_batch([Metric(DROPPED_METRIC, float(self.dropped_points), int(time.time() * 1000), self._last_step)])
            self._dropped_reported = self.dropped_points
        except Exception as error:  # noqa: BLE001
            logger.warning("could not log %s to run %s: %s", DROPPED_METRIC, self.run_id, redact(str(error)))


# ---- system metrics (tracking.system_metrics) ------------------------------------------------------

SYSTEM_METRICS_INTERVAL_S = 10.0


def start_system_metrics(uri: str, run_id: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S):
    """MLflow's system-metrics monitor for one trial run (CPU, memory, disk, network; GPU utilisation and
    memory where pynvml finds a GPU), sampled every interval_s in a daemon thread, logged as `system/*`
    metrics of the run, continuing its step count after a retry. Returns it started; call `.finish()`.
    Off by default (tracking.system_metrics): bench/system_metrics.py measures what it costs a trial."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                   resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor
