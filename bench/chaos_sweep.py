"""Reliability, issue 23 promise 2: a 4-trial sweep while a seeded chaos loop SIGKILLs trial workers.

    python bench/chaos_sweep.py                          # 4 trials of 150 steps, a kill every 20 s, seed 23
    python bench/chaos_sweep.py --every 10 --steps 300 --seed 7

It starts the embedded `mlflow server` (127.0.0.1, SQLite in a fresh folder) and runs `dpo sweep` of the
quickstart config as a grid of four betas on a local Ray with unlimited restarts (failure.max_failures
-1). Every `--every` seconds a chaos thread picks one live trial process at random (seeded) among this
driver's own Ray processes (the warm trial actors, `ray::ImplicitFunc`; the Ray Train workers in
trial_mode train) and SIGKILLs it. When the
sweep ends it checks and prints: every trial's status and last step, the number of MLflow runs per trial
(exactly one wanted), and for each run whether the train/loss curve holds every logged step exactly once
(no gap, no step twice); the kills made and the restarts seen (a trial's step going back in Tune's
result.json). Writes the figures as JSON to --out. Minutes of Ray time: a benchmark, never a test (the
CI tests of the pieces are tests/test_chaos_journal.py and tests/test_reliability_ray.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
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

TRIAL_ACTORS = ("ray::ImplicitFunc", "ray::RayTrainWorker")  # process titles of trial processes


class Chaos(threading.Thread):
    """Every `every` seconds: SIGKILL one live trial process, chosen with a seeded generator."""

    def __init__(self, every: float, seed: int):
        super().__init__(daemon=True)
        self.every, self.rng = every, random.Random(seed)
        self.finished = threading.Event()
        self.kills: list[dict] = []
        self.seen_classes: set[str] = set()

    def trial_processes(self) -> list[tuple[int, str]]:
        """This driver's own trial processes (descendants of this process: other Ray instances on the machine
        are never touched), by their Ray process title, e.g. `ray::ImplicitFunc.train`."""
        import psutil

        found = []
        for process in psutil.Process().children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if title.startswith("ray::"):
                self.seen_classes.add(title.split()[0])
                if any(marker in title for marker in TRIAL_ACTORS):
                    found.append((process.pid, title.split()[0]))
        return sorted(found)

    def run(self) -> None:
        started = time.monotonic()
        while not self.finished.wait(self.every):
            candidates = self.trial_processes()
            if not candidates:
                continue
            pid, name = self.rng.choice(candidates)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"at_s": round(time.monotonic() - started, 1), "pid": pid, "actor": name})
            print(f"chaos: SIGKILL {name} pid {pid} at {self.kills[-1]['at_s']} s", flush=True)


def restarts_in(trial_dir: Path) -> int:
    """How often the trial's reported step went back (each restart from a checkpoint does it once)."""
    steps, restarts = [], 0
    path = trial_dir / "result.json"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue
    for before, after in zip(steps, steps[1:]):
        restarts += after <= before
    return restarts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="sweep config (default: the quickstart)")
    parser.add_argument("--steps", type=int, default=150, help="train.max_steps of each trial")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between two kills")
    parser.add_argument("--seed", type=int, default=23, help="seed of the chaos loop's choices")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/chaos-sweep-<date>.json)")
    args = parser.parse_args()

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    storage = Path(tempfile.mkdtemp(prefix="dpo-bench-chaos-"))
    server = EmbeddedServer(storage / "mlflow-server")
    url = server.start_or_reuse()
    log_every = 5
    config = load_config(args.config, [
        f"storage_path={storage / 'runs'}", f"output_dir={storage / 'outputs'}", f"tracking.uri={url}",
        "sweep.strategy=grid", "sweep.beta=[0.1,0.2,0.3,0.4]", f"train.max_steps={args.steps}",
        f"train.log_every={log_every}", f"train.eval_every={max(1, args.steps // 3)}", "train.checkpoint_every=10",
        "failure.max_failures=-1", "resources.cpus_per_worker=1", *args.overrides])
    experiment = resolve_experiment(config)
    chaos = Chaos(args.every, args.seed)
    chaos.start()
    started = time.time()
    try:
        summary = run_sweep(experiment)
    finally:
        chaos.finished.set()
        chaos.join(5)
    wall = time.time() - started
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        experiment_id = client.get_experiment_by_name(experiment.tracking.experiment).experiment_id
        runs = client.search_runs([experiment_id], max_results=1000)
        max_steps = experiment.run.loop.max_steps
        expected = sorted({1, max_steps, *range(log_every, max_steps + 1, log_every)})
        trials = []
        for trial in summary["trials"]:
            own = [r for r in runs if r.data.tags.get(TRIAL_ID_TAG) == trial["trial_id"]]
            curves = {}
            for run in own:
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
                curves[run.info.run_id] = {"points": len(steps), "missing": len(set(expected) - set(steps)),
                                           "twice": len(steps) - len(set(steps)), "status": run.info.status}
            trials.append({"trial_id": trial["trial_id"], "beta": trial["config"].get("beta"), "error": trial["error"],
                           "last_step": trial["step"], "mlflow_runs": len(own), "curves": curves,
                           "restarts": restarts_in(Path(trial["path"]))})
    finally:
        server.stop()
    complete = all(t["error"] is None and t["last_step"] == max_steps and t["mlflow_runs"] == 1
                   and all(c["missing"] == 0 and c["twice"] == 0 and c["status"] == "FINISHED" for c in t["curves"].values())
                   for t in trials)
    figures = {
        "date": datetime.date.today().isoformat(), "steps": args.steps, "kill_every_s": args.every, "seed": args.seed,
        "sweep_wall_seconds": round(wall, 1), "kills": len(chaos.kills), "kill_log": chaos.kills,
        "restarts": sum(t["restarts"] for t in trials), "trials": trials, "every_trial_complete": complete,
        "ray_processes_seen": sorted(chaos.seen_classes), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"chaos-sweep-{figures['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "kill_log"}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
