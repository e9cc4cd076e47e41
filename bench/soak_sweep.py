"""Reliability, issue 23 promise 9: a 20-trial soak while the embedded MLflow server is restarted twice.

    python bench/soak_sweep.py                              # 20 betas, 12 steps each, restarts after trials 5 and 12
    python bench/soak_sweep.py --trials 8 --steps 20 --restart-after 2 5

It starts the embedded MLflow server (`mlflow server` on 127.0.0.1, SQLite in a fresh folder) and runs, in
this process as `dpo sweep` does, the quickstart config as a grid of --trials betas with short trials
(--steps steps, every metric logged every --log-every steps, the reference model run live, one CPU per
trial) on a local Ray. A watcher thread stops the
server once the Tune trial table shows the first --restart-after count of trials finished, and starts it
again on the same port and database --down seconds later; the same for the second count. When the sweep
ends it reads MLflow and prints one JSON line: trial runs found / expected, and metric points found /
expected, where the expected points are every (metric, step) of the train/ and eval/ metrics that Tune
received from the trials (result.json) and a point is found when MLflow holds that metric at that step.
Promise: >= 99% of the points. Minutes of Ray time: a benchmark; its last figure is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config.loading import load_config  # noqa: E402
from orchestrator.config.spec import resolve_experiment  # noqa: E402
from orchestrator.tracking.schema import TRIAL_ID_TAG  # noqa: E402
from orchestrator.tracking.server import EmbeddedServer  # noqa: E402
from orchestrator.workflows.sweep import run_sweep  # noqa: E402

LOGGED_PREFIXES = ("train/", "eval/")


def finished_trials(tune_root: Path) -> int:
    """Trials TERMINATED in Tune's newest experiment_state file (written every second: TUNE_GLOBAL_CHECKPOINT_S)."""
    for path in sorted(tune_root.glob("experiment_state-*.json"), reverse=True):
        try:
            return sum(json.loads(entry[0])["status"] == "TERMINATED" for entry in json.loads(path.read_text())["trial_data"])
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            continue  # being written
    return 0


class Restarter(threading.Thread):
    """Stops the server when `after[i]` trials have finished and starts it again `down_s` seconds later."""

    def __init__(self, server: EmbeddedServer, port: int, tune_root: Path, after: list[int], down_s: float):
        super().__init__(daemon=True)
        self.server, self.port, self.tune_root, self.after, self.down_s = server, port, tune_root, after, down_s
        self.done = threading.Event()
        self.restarts: list[dict] = []

    def run(self) -> None:
        started = time.monotonic()
        for count in self.after:
            while finished_trials(self.tune_root) < count:
                if self.done.wait(0.5):
                    return
            stopped_at = time.monotonic()
            self.server.stop()
            time.sleep(self.down_s)
            self.server.start_or_reuse(port=self.port)
            self.restarts.append({"after_trials": count, "stopped_at_s": round(stopped_at - started, 1),
                                  "down_s": round(time.monotonic() - stopped_at, 1)})
            print(f"soak: MLflow server restarted after {count} finished trials ({self.restarts[-1]})", flush=True)


def ephemeral_port() -> int:
    """A free port from the kernel's ephemeral range (which it hands out in turn, so rarely the same soon)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def expected_points(trial_dir: Path) -> set[tuple[str, int]]:
    """Every (metric, step) of the train/ and eval/ metrics Tune received from a trial (its result.json)."""
    points = set()
    path = trial_dir / "result.json"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        points |= {(key, int(result["step"])) for key in result if key.startswith(LOGGED_PREFIXES)}
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="grid of this many betas (0.05, 0.1, ...)")
    parser.add_argument("--steps", type=int, default=12, help="train.max_steps of each trial")
    parser.add_argument("--log-every", type=int, default=2, help="train.log_every (eval at the last step)")
    parser.add_argument("--restart-after", type=int, nargs="+", default=[5, 12], help="finished trials before each restart")
    parser.add_argument("--down", type=float, default=10.0, help="seconds the server stays down at each restart")
    args = parser.parse_args()

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    storage = Path(tempfile.mkdtemp(prefix="dpo-bench-soak-"))
    server = EmbeddedServer(storage / "mlflow-server")
    # not the default port 5000: while this server is down, a sweep started by someone else on this machine
    # would take that port, and the trials would log into the wrong server
    url = server.start_or_reuse(port=ephemeral_port())
    port = server.state()["port"]
    betas = [round(0.05 * (i + 1), 2) for i in range(args.trials)]
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [
        f"storage_path={storage / 'runs'}", f"output_dir={storage / 'outputs'}", f"tracking.uri={url}",
        "sweep.strategy=grid", f"sweep.beta=[{','.join(map(str, betas))}]", f"train.max_steps={args.steps}",
        "train.warmup_steps=2", f"train.log_every={args.log_every}", f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}", "resources.cpus_per_worker=1",
        "reference.mode=live"])  # short trials: no precomputed pass over all 4,000 pairs (minutes on 2 loaded cores)
    experiment = resolve_experiment(config)
    restarter = Restarter(server, port, Path(experiment.layout.root), args.restart_after, args.down)
    restarter.start()
    started = time.time()
    try:
        summary = run_sweep(experiment)
        wall = time.time() - started
        restarter.done.set()
        restarter.join(60)
        server.start_or_reuse(port=port)  # up, in case the sweep ended while it was down

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        experiment_id = client.get_experiment_by_name(experiment.tracking.experiment).experiment_id
        runs = [r for r in client.search_runs([experiment_id], max_results=1000) if r.data.tags.get(TRIAL_ID_TAG)]
        points_expected = points_found = 0
        unfinished = []
        for trial in summary["trials"]:
            expected = expected_points(Path(trial["path"]))
            own = [r for r in runs if r.data.tags.get(TRIAL_ID_TAG) == trial["trial_id"]]
            found = set()
            for run in own:
                unfinished += [trial["trial_id"]] if run.info.status != "FINISHED" else []
                for key in {key for key, _ in expected}:
                    found |= {(key, m.step) for m in client.get_metric_history(run.info.run_id, key)}
            points_expected += len(expected)
            points_found += len(expected & found)
    finally:
        server.stop()
    share = points_found / max(points_expected, 1)
    print(json.dumps({
        "date": datetime.date.today().isoformat(), "trials": args.trials, "steps": args.steps,
        "sweep_wall_seconds": round(wall, 1), "server_restarts": restarter.restarts,
        "trial_errors": sum(t["error"] is not None for t in summary["trials"]),
        "runs_found": len({r.data.tags[TRIAL_ID_TAG] for r in runs}), "runs_expected": len(summary["trials"]),
        "runs_not_finished": unfinished, "points_found": points_found, "points_expected": points_expected,
        "points_share": round(share, 5), "promise_met": share >= 0.99 and len(runs) == len(summary["trials"]),
        "cpus": os.cpu_count(), "load_average_at_end": round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
