"""A durable local journal of one MLflow run's metric points: what a killed process had not yet delivered.

`TrialTracker` (trial_tracker.py) sends metric points from an in-memory buffer; when its process is killed
(SIGKILL, a lost node, a killed driver taking its trials with it) the buffered points would be lost and
the run's curves would end early or hold a gap. With a journal, every point is also appended to
`<folder>/<run id>.jsonl` the moment it is logged (one `write` per log call, before log_metrics returns,
so a killed process loses nothing it logged; only a crash of the machine itself could), and
`<run id>.acked` holds the sequence number up to which MLflow has acknowledged (or the tracker has given
up on: points dropped on a full buffer or a permanent rejection) every point. A tracker opened on the
same journal, by a retried trial or by `replay_journals` when a sweep is resumed, first sends the points
after that number again, with their original timestamps; and a retried trial, which trains again the
steps after its last checkpoint, does not log a (key, step) the journal already holds, so its curves get
no step twice. MLflow's SQL store ignores a point identical in
key, step, value and timestamp to one it holds, so a point sent twice (delivered, then killed before its
acknowledgement was written) is stored once. Pure Python; no mlflow import here.
Tested by `python -m pytest tests/test_chaos_journal.py -q`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
ACKED_SUFFIX = ".acked"
ACKED_WIDTH = 20  # the acknowledged sequence number, written in place with one pwrite (never torn by a kill)


def journal_path(folder: str | Path, run_id: str) -> Path:
    return Path(folder) / f"{run_id}{SUFFIX}"


def _open(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class MetricJournal:
    """Append-only points of one run, plus how far MLflow acknowledged them. Not thread-safe on its own:
    TrialTracker calls `append` under its lock and `acknowledge` from its sending thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acked_fd = _open(self.path.with_suffix(ACKED_SUFFIX), os.O_RDWR)
        self.acked = _read_acked(self._acked_fd)
        self.pending, last_seq, self.logged = _read_points(self.path, self.acked)  # logged, never acknowledged
        self.next_seq = max(last_seq, self.acked) + 1
        self._fd = _open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, points: Iterable[Any]) -> None:
        """Give each point (an object with key, value, step, timestamp_ms) its sequence number and write it."""
        lines = []
        for point in points:
            point.seq = self.next_seq
            self.next_seq += 1
            lines.append(json.dumps({"s": point.seq, "k": point.key, "v": point.value, "t": point.step,
                                     "ms": point.timestamp_ms}))
        if lines:
            os.write(self._fd, ("\n".join(lines) + "\n").encode())

    def acknowledge(self, through_seq: int) -> None:
        """Every point up to `through_seq` is delivered (or given up): none of them is sent again."""
        if through_seq > self.acked:
            os.pwrite(self._acked_fd, f"{through_seq:>{ACKED_WIDTH}}\n".encode(), 0)
            self.acked = through_seq

    def close(self) -> None:
        for fd in (self._fd, self._acked_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._acked_fd = -1


def _read_acked(fd: int) -> int:
    raw = os.pread(fd, ACKED_WIDTH + 1, 0).decode("ascii", "replace").strip()
    return int(raw) if raw.isdigit() else 0


def _read_points(path: Path, after_seq: int) -> tuple[list[dict[str, Any]], int, set[tuple[str, int]]]:
    """Points with a sequence number above `after_seq` (in order), the highest sequence number seen, and every
    (key, step) the journal holds."""
    if not path.is_file():
        return [], 0, set()
    pending, last, logged = [], 0, set()
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                seq, value = int(record["s"]), float(record["v"])
                point = {"seq": seq, "key": str(record["k"]), "value": value, "step": int(record["t"]),
                         "timestamp_ms": int(record["ms"])}
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a full disk: nothing to replay from it
            last = max(last, seq)
            logged.add((point["key"], point["step"]))
            if seq > after_seq:
                pending.append(point)
    return pending, last, logged


def unacknowledged(folder: str | Path) -> dict[str, int]:
    """Per run id under `folder`: how many journaled points MLflow has not acknowledged."""
    counts = {}
    for path in sorted(Path(folder).glob(f"*{SUFFIX}")) if Path(folder).is_dir() else []:
        acked_path = path.with_suffix(ACKED_SUFFIX)
        acked = int(acked_path.read_text().strip() or 0) if acked_path.is_file() else 0
        counts[path.stem] = len(_read_points(path, acked)[0])
    return counts


def replay_journals(uri: str, folder: str | Path, timeout_s: float = 120.0) -> dict[str, int]:
    """Send every run's unacknowledged points under `folder` to MLflow at `uri` (a resumed sweep's driver does
    this before any trial starts); returns the count sent per run id (runs with nothing pending left out)."""
    from orchestrator.tracking.trial_tracker import TrialTracker

    sent = {}
    for run_id, count in unacknowledged(folder).items():
        if count == 0:
            continue
        tracker = TrialTracker(uri, run_id, journal=journal_path(folder, run_id), report_drops=False)
        delivered = tracker.close(timeout_s=timeout_s)
        logger.info("MLflow run %s: %d metric points of a killed process replayed from %s%s", run_id, count, folder,
                    "" if delivered else " (not all delivered; the rest stay in the journal)")
        sent[run_id] = count
    return sent
