"""What MLflow's system-metrics monitor (tracking.system_metrics) costs a trial: the CPU time its sampling
thread takes, per sample and as a share of one CPU at the trial's 10 s interval.

It runs the monitor of orchestrator/tracking/trial_tracker.py on a run of a throwaway SQLite store for
`--seconds` with a `--interval` (short, so that many samples are taken), and compares this process's CPU
time with an idle stretch of the same length. On a loaded machine both stretches are inflated alike; the
printed figures are CPU seconds, not wall time.

    python bench/system_metrics.py [--seconds 20] [--interval 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import psutil


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.trial_tracker import SYSTEM_METRICS_INTERVAL_S, start_system_metrics

    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("bench-system-metrics")).info.run_id
        process = psutil.Process()
        start = cpu_seconds(process)
        time.sleep(args.seconds)
        idle = cpu_seconds(process) - start
        monitor = start_system_metrics(uri, run_id, interval_s=args.interval)
        start = cpu_seconds(process)
        time.sleep(args.seconds)
        busy = cpu_seconds(process) - start
        monitor.finish()
        metrics = client.get_run(run_id).data.metrics
        samples = max(1, len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")))
    per_sample = max(0.0, busy - idle) / samples
    print(f"system metrics logged: {len(metrics)} keys ({', '.join(sorted(metrics)[:4])}, ...), {samples} samples")
    print(f"CPU: idle {idle:.3f} s, monitoring {busy:.3f} s over {args.seconds:.0f} s -> {per_sample * 1000:.1f} ms per sample")
    print(f"at the trial interval of {SYSTEM_METRICS_INTERVAL_S:.0f} s: {100 * per_sample / SYSTEM_METRICS_INTERVAL_S:.2f}% "
          "of one CPU")


if __name__ == "__main__":
    main()
