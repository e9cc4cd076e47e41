"""Reliability, issue 23 promise 8: a sweep driver SIGKILLed after its first finished trial, then resumed.

    python bench/driver_kill.py --repeats 3                # 3 scenarios, seeds 23, 24, 25
    python bench/driver_kill.py --repeats 1 --seed 7 --steps 20

Each repetition runs `dpo sweep` of the quickstart config, shortened (a grid of three betas, --steps
steps each, train/loss logged every --log-every steps, the reference model run live), as a child process
in its own process group with the embedded MLflow server. Once Tune records the first trial TERMINATED it
waits a seeded random delay (0 to --max-delay s), SIGKILLs the driver's process group and every process
below it (its local Ray and the MLflow server it started), then runs `dpo sweep --resume` with the same arguments. It then reads
MLflow: a repetition is complete when every trial has exactly one run, FINISHED (none RUNNING), whose
train/loss history holds every logged step exactly once. Prints one JSON line per repetition and a last
line with the count of complete repetitions. `scenario` is also what tests/test_chaos_driver_kill.py runs.
Minutes per repetition on 2 CPU cores: a benchmark; its last figure is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.1, 0.2, 0.3)


def sweep_command(root: Path, steps: int, log_every: int, *extra: str) -> list[str]:
    """`dpo sweep` of the shortened quickstart, storing everything under root."""
    overrides = [f"storage_path={root / 'runs'}", f"output_dir={root / 'outputs'}", "sweep.strategy=grid",
                 f"sweep.beta=[{','.join(map(str, BETAS))}]", f"train.max_steps={steps}", "train.warmup_steps=2",
                 f"train.log_every={log_every}", f"train.eval_every={steps}", f"train.checkpoint_every={max(1, steps // 2)}",
                 # the reference model runs beside each step: no precomputed pass over all 4,000 pairs (minutes on
                 # 2 loaded cores) for trials that read a few hundred of them
                 "reference.mode=live"]
    return [sys.executable, "-m", "orchestrator", "sweep", str(REPO / "configs/quickstart.yaml"),
            *[item for override in overrides for item in ("--set", override)], *extra]


def trial_states(tune_root: Path) -> dict[str, str]:
    """trial_id -> status in Tune's newest experiment_state file (written every second: TUNE_GLOBAL_CHECKPOINT_S)."""
    for path in sorted(tune_root.glob("experiment_state-*.json"), reverse=True):
        try:
            return {json.loads(entry[0])["trial_id"]: json.loads(entry[0])["status"]
                    for entry in json.loads(path.read_text())["trial_data"]}
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            continue  # being written
    return {}


def kill_group_and_tree(leader: int) -> int:
    """SIGKILL a process group and every descendant of its leader (found first: they may have groups of their
    own, as the MLflow server has); the number of processes killed."""
    import psutil

    try:
        victims = [psutil.Process(leader), *psutil.Process(leader).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    return len(victims)


def check_mlflow(root: Path, steps: int, log_every: int) -> dict[str, Any]:
    """Every trial's runs and train/loss steps, from the MLflow server of the resumed sweep."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.schema import TRIAL_ID_TAG

    summary = json.loads((root / "runs" / "quickstart" / "sweep_summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["mlflow"]["uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]], max_results=1000)
    expected = sorted({1, steps, *range(log_every, steps + 1, log_every)})
    trials = []
    for trial in summary["trials"]:
        own = [r for r in runs if r.data.tags.get(TRIAL_ID_TAG) == trial["trial_id"]]
        curves = []
        for run in own:
            logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
            curves.append({"status": run.info.status, "points": len(logged),
                           "missing": sorted(set(expected) - set(logged)), "twice": len(logged) - len(set(logged))})
        trials.append({"trial_id": trial["trial_id"], "error": trial["error"], "last_step": trial["step"],
                       "runs": len(own), "curves": curves})
    complete = len(trials) == len(BETAS) and all(
        t["error"] is None and t["last_step"] == steps and t["runs"] == 1
        and all(c["status"] == "FINISHED" and not c["missing"] and not c["twice"] for c in t["curves"]) for t in trials)
    return {"trials": trials, "expected_points_per_run": len(expected), "complete": complete}


def scenario(root: Path, seed: int, steps: int = 20, log_every: int = 2, max_delay_s: float = 8.0,
             timeout_s: float = 600.0) -> dict[str, Any]:
    """One repetition under root (a fresh folder); the figures, with `complete` the verdict."""
    from orchestrator.config.layout import mlflow_root
    from orchestrator.tracking.server import EmbeddedServer

    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    delay = random.Random(seed).uniform(0.0, max_delay_s)
    tune_root = root / "runs" / "quickstart"
    figures: dict[str, Any] = {"seed": seed, "delay_s": round(delay, 2)}
    started = time.monotonic()
    try:
        with (root / "first.log").open("w") as log:
            first = subprocess.Popen(sweep_command(root, steps, log_every), cwd=root, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not any(state == "TERMINATED" for state in trial_states(tune_root).values()):
                if first.poll() is not None or time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"no trial finished (exit {first.poll()}): {(root / 'first.log').read_text()[-3000:]}")
                time.sleep(0.1)
            figures["first_trial_finished_s"] = round(time.monotonic() - started, 1)
            time.sleep(delay)
            figures["driver_alive_at_kill"] = first.poll() is None
            figures["states_at_kill"] = sorted(trial_states(tune_root).values())
        finally:
            figures["processes_killed"] = kill_group_and_tree(first.pid)
            first.wait(timeout=30)
        with (root / "resume.log").open("w") as log:
            second = subprocess.run(sweep_command(root, steps, log_every, "--resume"), cwd=root, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, timeout=timeout_s)
        figures["resume_exit"] = second.returncode
        if second.returncode != 0:
            figures.update(complete=False, resume_log=(root / "resume.log").read_text()[-3000:])
            return figures
        figures.update(check_mlflow(root, steps, log_every))
    finally:
        EmbeddedServer(mlflow_root(str(root / "runs"))).stop()  # the resumed sweep's server
        figures["seconds"] = round(time.monotonic() - started, 1)
    return figures


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="scenarios to run (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=23, help="seed of the first scenario's kill delay")
    parser.add_argument("--steps", type=int, default=20, help="train.max_steps of each trial")
    parser.add_argument("--log-every", type=int, default=2, help="train.log_every")
    parser.add_argument("--max-delay", type=float, default=8.0, help="most seconds between the first finished trial and the kill")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    complete = 0
    for repeat in range(args.repeats):
        root = Path(tempfile.mkdtemp(prefix="dpo-bench-driver-kill-"))
        figures = scenario(root, args.seed + repeat, args.steps, args.log_every, args.max_delay)
        complete += bool(figures.get("complete"))
        print(json.dumps(figures), flush=True)
    print(json.dumps({"date": datetime.date.today().isoformat(), "repeats": args.repeats, "complete": complete,
                      "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
