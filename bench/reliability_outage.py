"""Reliability, issue 7 item 7 on real Ray: the MLflow server is down for 30 s during a `dpo sweep` trial.

    python bench/reliability_outage.py                      # embedded demo model, one trial of 450 steps
    python bench/reliability_outage.py --steps 600 --outage-seconds 60

It starts the embedded `mlflow server` (127.0.0.1, SQLite in a fresh folder), runs a one-trial sweep of
the quickstart config against it on a local Ray, stops the server once Tune has seen step 20 of the trial,
and starts it again `--outage-seconds` later on the same port and backend store. When the sweep ends it
compares what the trial reported to Tune (every step) with what reached the trial's MLflow run, and prints:
the outage and how many steps trained during it, the trial's status, metric points logged vs arrived,
`tracking/dropped_points`, and the gap the tracker recorded as `tracking/outage_seconds`.
Writes the figures as JSON to --out. Too slow for CI (Ray start-up plus a 30 s outage); the CI test with
the same TrialTracker in one process is tests/test_reliability_mlflow.py. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config.loading import load_config  # noqa: E402
from orchestrator.config.spec import resolve_experiment  # noqa: E402
from orchestrator.tracking.schema import DROPPED_METRIC, OUTAGE_METRIC, TRIAL_ID_TAG  # noqa: E402
from orchestrator.tracking.server import EmbeddedServer  # noqa: E402
from orchestrator.workflows.sweep import run_sweep  # noqa: E402

NOT_METRICS = {"step", "perf/step_seconds_total", "perf/eval_seconds_total"}


def tune_results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    results = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return results


def logged_keys(result: dict) -> list[str]:
    """The keys of one Tune result that the trial's report also sent to MLflow (train/..., eval/...)."""
    return [key for key, value in result.items() if key.startswith(("train/", "eval/")) and isinstance(value, (int, float))]


class Outage(threading.Thread):
    """Stops the server when the trial reaches `down_at_step`, restarts it `seconds` later on the same port."""

    def __init__(self, server: EmbeddedServer, url: str, tune_root: Path, down_at_step: int, seconds: float):
        super().__init__(daemon=True)
        self.server, self.url, self.tune_root = server, url, tune_root
        self.down_at_step, self.seconds = down_at_step, seconds
        self.down_at = self.up_at = None
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            if any(r.get("step", 0) >= self.down_at_step for d in self.tune_root.glob("*/") for r in tune_results(d)):
                break
            time.sleep(0.05)
        else:
            return
        self.server.stop()
        self.down_at = time.time()
        print(f"MLflow server stopped at {datetime.datetime.now():%H:%M:%S}", flush=True)
        time.sleep(self.seconds)
        port = int(self.url.rsplit(":", 1)[1])
        assert self.server.start_or_reuse(port=port, timeout_s=300) == self.url
        self.up_at = time.time()
        print(f"MLflow server back on {self.url} after {self.up_at - self.down_at:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="sweep config (default: the quickstart)")
    parser.add_argument("--steps", type=int, default=450, help="train.max_steps of the one trial")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="how long the server stays down")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/reliability-outage-<date>.json)")
    args = parser.parse_args()

    storage = Path(tempfile.mkdtemp(prefix="dpo-bench-outage-"))
    server = EmbeddedServer(storage / "mlflow-server")
    url = server.start_or_reuse()
    config = load_config(args.config, [
        f"storage_path={storage / 'runs'}", f"output_dir={storage / 'outputs'}", f"tracking.uri={url}",
        "sweep.strategy=grid", "sweep.beta=[0.2]", f"train.max_steps={args.steps}", "train.log_every=1",
        f"train.eval_every={max(1, args.steps // 6)}", f"train.checkpoint_every={max(1, args.steps // 3)}",
        *args.overrides])
    experiment = resolve_experiment(config)
    outage = Outage(server, url, Path(experiment.layout.root), down_at_step=20, seconds=args.outage_seconds)
    outage.start()
    started = time.time()
    try:
        summary = run_sweep(experiment)
    finally:
        outage.finished.set()
        outage.join(args.outage_seconds + 360)
    ended = time.time()
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        [trial] = summary["trials"]
        results = tune_results(Path(trial["path"]))
        [run] = [r for r in client.search_runs([client.get_experiment_by_name(experiment.tracking.experiment).experiment_id])
                 if r.data.tags.get(TRIAL_ID_TAG) == trial["trial_id"]]
        logged: dict[str, int] = {}
        for result in results:
            for key in logged_keys(result):
                logged[key] = logged.get(key, 0) + 1
        arrived = {key: len(client.get_metric_history(run.info.run_id, key)) for key in logged}
        gap = [point.value for point in client.get_metric_history(run.info.run_id, OUTAGE_METRIC)]
        during = [r["step"] for r in results if outage.down_at and outage.up_at and outage.down_at < r["timestamp"] < outage.up_at]
        figures = {
            "date": datetime.date.today().isoformat(), "steps": args.steps,
            "outage_seconds_injected": args.outage_seconds,
            "server_down_to_up_seconds": (outage.up_at - outage.down_at) if outage.up_at else None,
            "steps_trained_while_down": len(during), "sweep_wall_seconds": ended - started,
            "trial_error": trial["error"], "trial_final_step": trial["step"], "mlflow_run_status": run.info.status,
            "points_logged": sum(logged.values()), "points_arrived": sum(arrived.values()),
            "dropped_points": run.data.metrics.get(DROPPED_METRIC), "outage_seconds_recorded": gap,
        }
    finally:
        server.stop()
    figures["arrived_fraction"] = figures["points_arrived"] / max(1, figures["points_logged"])
    out = Path(args.out or Path(__file__).parent / "results" / f"reliability-outage-{figures['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
