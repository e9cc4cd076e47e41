"""Reliability (issue 7) of `dpo sweep` on a real local Ray and a real MLflow server: the test kills things.

One sweep meets the faults of items 1 to 3, one after the other, and each test checks one item:
a grid over learning_rate [1e8, 5e-3, 4e-3], one trial at a time, `failure.max_failures: 1`,
120 steps of batch 8 with every step reported and a checkpoint every 5 steps.
- Item 2: lr 1e8 blows the weights up in the first update: the loss is non-finite at step 2 on every attempt,
  before any checkpoint. The trial must end ERROR after at most max_failures + 1 attempts with the original
  error, its MLflow run FAILED, and the sweep must go on.
- Item 1: the test SIGKILLs the process that runs the 5e-3 trial's engine just after its first checkpoint: the
  warm trial's Tune actor (one worker per trial runs warm, docs/sweeps.md#warm-trials; a Ray Train trial's
  worker otherwise). The trial must restart from its last checkpoint, redo at most one checkpoint interval, end
  with the metrics of an uninterrupted run (1e-5 on CPU) and keep one MLflow run.
- Item 3 (and issue 4): while the 4e-3 trial runs past its first checkpoint, the test SIGKILLs the `dpo sweep`
  driver and the local Ray it started. `dpo sweep --resume` must finish every trial, rerun none that finished,
  resume the running one from its checkpoint and leave exactly one MLflow run per trial, none RUNNING.
- Item 8: while trials run, every socket the local Ray and the MLflow server listen on is on 127.0.0.1.
Item 1 for trials of several workers (a TorchTrainer per trial, Ray Train restarts its worker group) is
tests/test_fsdp_sweep.py, with the procedure below (kill_one_worker_past_a_checkpoint): a two-worker FSDP trial
of the embedded default loses one RayTrainWorker after a sharded checkpoint, and the group goes on from it.
The MLflow server is the embedded one (SQLite under pytest's tmp folder), started and stopped by the test.
Run: `python -m pytest tests/test_reliability_ray.py -q --durations=5` (3 to 6 minutes on 2 CPU cores, by load).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from orchestrator.config import ExperimentConfig
from orchestrator.config.spec import resolve_run, trial_mode
from orchestrator.tracking.server import EmbeddedServer
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # CPU float32: a restarted trial against an uninterrupted run
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
CHECKPOINT_EVERY, MAX_STEPS, MAX_FAILURES = 5, 120, 1  # long enough to stop a warm trial mid-way (reports take ms)
NAN_LR, KILLED_WORKER_LR, KILLED_DRIVER_LR = 1e8, 5e-3, 4e-3
FINAL_METRICS = ("train/loss", "train/reward_margin", "train/grad_norm", "train/kl", "eval/loss",
                 "eval/preference_accuracy", "eval/reward_margin")

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.integration]


# ---- reading what Tune, Ray and MLflow recorded ---------------------------------------------------

def tune_results(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result Tune recorded for a trial, in order (result.json: one JSON object per line)."""
    path = trial_dir / "result.json"
    results = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line being written
    return results


def trial_ids_by_learning_rate(root: Path) -> dict[float, str]:
    found = {}
    for params in root.glob("*/params.json"):
        try:
            found[json.loads(params.read_text())["learning_rate"]] = params.parent.name
        except (json.JSONDecodeError, KeyError):
            continue  # being written
    return found


def experiment_trial_states(root: Path) -> dict[str, str]:
    """trial_id -> status from Tune's newest experiment_state file (newest by name, as Tune restores)."""
    for path in sorted(root.glob("experiment_state-*.json"), reverse=True):
        try:
            trials = [json.loads(entry[0]) for entry in json.loads(path.read_text())["trial_data"]]
            return {trial["trial_id"]: trial["status"] for trial in trials}
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            continue  # being written
    return {}


def past_first_checkpoint(results: list[dict[str, Any]]) -> bool:
    """Tune has the report after a checkpoint's report, so the checkpoint is registered (by Ray Train for a
    Ray Train trial, whose reports carry checkpoint_path; by Tune for a warm one: checkpoint_dir_name)."""
    return (any("checkpoint_path" in r or r.get("checkpoint_dir_name") for r in results)
            and any(r["step"] > CHECKPOINT_EVERY for r in results))


def registered_checkpoint_steps(tune_root: Path, trial_id: str, trial_storage: Path) -> list[int]:
    """Steps of the checkpoints registered for a trial: what a restart or --resume starts from.

    A Ray Train trial: Ray Train's own record in the trial's storage (checkpoint_manager_snapshot.json), which
    can be ahead of Tune's result.json: Tune hears of a report only after Train has registered it. A warm trial:
    Tune's record, the trial's checkpoint manager in Tune's newest experiment_state file (Tune registers a
    checkpoint after the report's result, and restores a failed trial or a resumed sweep from that record).
    """
    snapshot_file = trial_storage / "checkpoint_manager_snapshot.json"
    if snapshot_file.is_file():
        try:
            snapshot = json.loads(snapshot_file.read_text())
            return sorted(result["metrics"]["step"] for result in snapshot["checkpoint_results"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return []
    from ray.tune.utils.serialization import TuneFunctionDecoder

    for path in sorted(tune_root.glob("experiment_state-*.json"), reverse=True):
        try:
            for trial_json, run_metadata in json.loads(path.read_text())["trial_data"]:
                if json.loads(trial_json)["trial_id"] == trial_id:
                    manager = json.loads(run_metadata, cls=TuneFunctionDecoder, allow_cloudpickle=True)["checkpoint_manager"]
                    return sorted(result.metrics["step"] for result in manager._checkpoint_results)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # being written
        return []
    return []


def settled(tune_root: Path, trial_id: str, trial_storage: Path, quiet_s: float = 2.5) -> dict[str, Any]:
    """Tune's results and the registered checkpoints of a trial whose worker is frozen, once both have stopped
    changing for quiet_s (Tune writes its experiment state every second here: TUNE_GLOBAL_CHECKPOINT_S)."""
    state, since = None, time.monotonic()
    while True:
        now = {"results": tune_results(tune_root / trial_id),
               "checkpoints": registered_checkpoint_steps(tune_root, trial_id, trial_storage)}
        if now != state:
            state, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return state
        time.sleep(0.05)


def train_workers(processes: list[psutil.Process], mode: str) -> list[psutil.Process]:
    """The processes among `processes` that run a trial's engine: a warm trial's Tune actor (Ray titles it
    ray::ImplicitFunc..., the class of a function trainable) or a Ray Train trial's workers (ray::RayTrainWorker...)."""
    title = "ImplicitFunc" if mode == "warm" else "RayTrainWorker"
    workers = []
    for process in processes:
        try:
            if title in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


def listening_addresses(processes: list[psutil.Process]) -> dict[str, set[str]]:
    """{pid and command line: the IP addresses it listens on} for every process that listens on TCP."""
    found: dict[str, set[str]] = {}
    for process in processes:
        try:
            title = f"{process.pid} {process.name()}: {' '.join(process.cmdline())[-80:]}"
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.setdefault(title, set()).add(connection.laddr.ip)
        except psutil.Error:
            continue
    return found


def kill_process_tree(process: psutil.Process) -> None:
    """SIGKILL a process and every descendant: a driver and the local Ray it started (GCS, raylet, workers)."""
    try:
        victims = [process] + process.children(recursive=True)
    except psutil.NoSuchProcess:
        return  # it has already exited
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"


def mlflow_client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def runs_of(url: str, experiment: str) -> list:
    client = mlflow_client(url)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-5000:]


# ---- the sweep and its faults ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory) -> dict[str, Any]:
    """Runs `dpo sweep`, injects the three faults, runs `dpo sweep --resume`; returns what each test needs."""
    root = tmp_path_factory.mktemp("faulty-sweep")
    model_dir = build_model_dir(root / "model", "llama")
    raw: dict[str, Any] = {
        "name": "faulty", "output_dir": str(root / "outputs"), "storage_path": str(root / "runs"),
        "model": {"path": str(model_dir)},
        "data": {"train": str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 32, seed=1))),
                 "eval": str(write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))), "max_length": 48},
        "train": {"learning_rate": KILLED_WORKER_LR, "batch_size": 8, "max_steps": MAX_STEPS, "warmup_steps": 0,
                  "log_every": 1, "eval_every": 15, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 2,
                  "max_grad_norm": None, "device": "cpu"},
        "reference": {"cache_dir": str(root / "reference-cache")},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "failure": {"max_failures": MAX_FAILURES},
        "sweep": {"strategy": "grid", "learning_rate": [NAN_LR, KILLED_WORKER_LR, KILLED_DRIVER_LR],
                  "max_concurrent_trials": 1},
    }
    server = EmbeddedServer(root / "mlflow")
    raw["tracking"] = {"uri": server.start_or_reuse(), "experiment": "faulty"}
    config_file = root / "faulty.yaml"
    config_file.write_text(json.dumps(raw))  # JSON is YAML
    mode = trial_mode(ExperimentConfig.model_validate(raw))  # warm: one worker per trial
    tune_root, trials_storage = root / "runs" / "faulty", root / "runs" / "faulty-trials"
    # Tune snapshots its trial table every 10 s or more by default; every second keeps "finished" current.
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1",
           "DPO_DEMO_CACHE": str(root / "demo-cache")}
    env.pop("MLFLOW_TRACKING_URI", None)

    def dpo_sweep(*arguments: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(config_file), *arguments],
                                cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    started = time.monotonic()
    try:
        first = dpo_sweep(log=root / "first.log")
        driver = psutil.Process(first.pid)
        faults: dict[str, Any] = {}
        try:
            deadline = time.monotonic() + 480
            while "driver_killed_at" not in faults:
                assert first.poll() is None, f"the sweep ended before every fault was injected:\n{log_tail(root / 'first.log')}"
                assert time.monotonic() < deadline, f"faults {faults} after 480 s:\n{log_tail(root / 'first.log')}"
                ids = trial_ids_by_learning_rate(tune_root)
                worker_trial, driver_trial = ids.get(KILLED_WORKER_LR), ids.get(KILLED_DRIVER_LR)
                if "worker_killed" not in faults and worker_trial and past_first_checkpoint(tune_results(tune_root / worker_trial)):
                    processes = [driver, *driver.children(recursive=True)]
                    workers = train_workers(processes, mode)
                    if len(workers) == 1:
                        server_process = psutil.Process(server.state()["pid"])
                        faults["listening"] = listening_addresses(
                            processes + [server_process, *server_process.children(recursive=True)])
                        workers[0].suspend()  # frozen, so what Tune has recorded is all it will get from it
                        faults["worker_killed"] = settled(tune_root, worker_trial, trials_storage / worker_trial)
                        os.kill(workers[0].pid, signal.SIGKILL)
                if ("worker_killed" in faults and driver_trial and past_first_checkpoint(tune_results(tune_root / driver_trial))
                        and experiment_trial_states(tune_root).get(worker_trial) == "TERMINATED"):
                    for worker in train_workers(driver.children(recursive=True), mode):
                        worker.suspend()  # frozen mid-trial, so it cannot finish before the driver dies
                    faults["driver_killed"] = settled(tune_root, driver_trial, trials_storage / driver_trial)
                    faults["driver_killed_at"] = time.time()
                time.sleep(0.02)
        finally:
            kill_process_tree(driver)
        first.wait(timeout=30)
        before_resume = {
            "states": experiment_trial_states(tune_root),
            "results": {trial_id: tune_results(tune_root / trial_id) for trial_id in trial_ids_by_learning_rate(tune_root).values()},
            "running_runs": [r.data.tags.get("trial_id") for r in runs_of(raw["tracking"]["uri"], "faulty")
                             if r.info.status == "RUNNING"],
        }
        second = dpo_sweep("--resume", log=root / "resume.log")
        try:
            exit_code = second.wait(timeout=480)
        finally:
            if second.poll() is None:
                kill_process_tree(psutil.Process(second.pid))
        assert exit_code == 0, log_tail(root / "resume.log")
        print(f"faulty sweep, both sessions: {time.monotonic() - started:.0f} s")
        yield {"raw": raw, "root": root, "tune_root": tune_root, "url": raw["tracking"]["uri"], "faults": faults,
               "before_resume": before_resume, "ids": trial_ids_by_learning_rate(tune_root),
               "summary": json.loads((tune_root / "sweep_summary.json").read_text()),
               "runs": runs_of(raw["tracking"]["uri"], "faulty")}
    finally:
        server.stop()


def uninterrupted_run(raw: dict[str, Any], learning_rate: float, output_dir: Path) -> dict[int, dict[str, Any]]:
    """The trial's training in this process, never interrupted, with the Train worker's one torch thread."""
    from trainables.entrypoints import run_dpo

    trial = ExperimentConfig.model_validate({**raw, "train": {**raw["train"], "learning_rate": learning_rate}})
    spec = resolve_run(trial, output_dir=str(output_dir), show_progress=False)
    reports: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, lambda metrics, _: reports.append(metrics))
    finally:
        torch.set_num_threads(threads)
    return {report["step"]: report for report in reports}


def run_of(faulty_sweep: dict[str, Any], trial_id: str):
    [run] = [r for r in faulty_sweep["runs"] if r.data.tags.get("trial_id") == trial_id]
    return run


# ---- item 1 ---------------------------------------------------------------------------------------

def test_a_killed_train_worker_restarts_from_its_last_checkpoint_and_ends_as_if_never_killed(faulty_sweep):
    trial_id, killed = faulty_sweep["ids"][KILLED_WORKER_LR], faulty_sweep["faults"]["worker_killed"]
    last_checkpoint = max(killed["checkpoints"])  # the newest checkpoint Ray Train had when the worker died
    results = tune_results(faulty_sweep["tune_root"] / trial_id)
    steps = [r["step"] for r in results]
    # The killed worker reported steps 1..k (Tune may hear of the last ones late), the new one last_checkpoint+1..end.
    k = len(steps) - (MAX_STEPS - last_checkpoint)
    print(f"worker killed after step {k} (Tune had seen {killed['results'][-1]['step']}); "
          f"the new worker started from the checkpoint of step {last_checkpoint}")
    assert k < MAX_STEPS, "the worker was killed after its trial had ended: nothing was restarted"
    assert steps == list(range(1, k + 1)) + list(range(last_checkpoint + 1, MAX_STEPS + 1)), steps
    assert last_checkpoint <= k <= last_checkpoint + CHECKPOINT_EVERY, "more than one checkpoint interval lost"

    uninterrupted = uninterrupted_run(faulty_sweep["raw"], KILLED_WORKER_LR, faulty_sweep["root"] / "uninterrupted")
    for key in FINAL_METRICS:
        assert math.isclose(results[-1][key], uninterrupted[MAX_STEPS][key], abs_tol=TOLERANCE), (
            f"{key}: restarted {results[-1][key]!r} vs uninterrupted {uninterrupted[MAX_STEPS][key]!r}")
    for result in results:
        assert math.isclose(result["train/loss"], uninterrupted[result["step"]]["train/loss"], abs_tol=TOLERANCE)

    run = run_of(faulty_sweep, trial_id)  # one run, through the restart
    assert run.info.status == "FINISHED"
    assert math.isclose(run.data.metrics["train/loss"], uninterrupted[MAX_STEPS]["train/loss"], abs_tol=TOLERANCE)
    history = mlflow_client(faulty_sweep["url"]).get_metric_history(run.info.run_id, "train/loss")
    assert set(range(last_checkpoint + 1, MAX_STEPS + 1)) <= {point.step for point in history}


# ---- item 2 ---------------------------------------------------------------------------------------

def test_an_error_on_every_attempt_ends_the_trial_after_max_failures_plus_one_attempts_and_the_sweep_goes_on(faulty_sweep):
    trials = {t["trial_id"]: t for t in faulty_sweep["summary"]["trials"]}
    failing = trials[faulty_sweep["ids"][NAN_LR]]
    assert failing["error"] and "NonFiniteLossError: non-finite" in failing["error"] and "at step 2" in failing["error"]
    assert all(trials[faulty_sweep["ids"][lr]]["error"] is None for lr in (KILLED_WORKER_LR, KILLED_DRIVER_LR))

    failed_run = run_of(faulty_sweep, failing["trial_id"])
    assert failed_run.info.status == "FAILED"
    assert "NonFiniteLossError: non-finite" in failed_run.data.tags["error"]
    assert failed_run.info.start_time < run_of(faulty_sweep, faulty_sweep["ids"][KILLED_WORKER_LR]).info.start_time
    # Each attempt reports step 1 to Tune and fails at step 2: one step-1 result per attempt, so no retry at all
    # would leave a single one. (MLflow holds step 1 once: a retry does not log a step its run's journal holds.)
    attempts = sum(1 for result in tune_results(faulty_sweep["tune_root"] / failing["trial_id"]) if result["step"] == 1)
    print(f"attempts of the failing trial: {attempts} (failure.max_failures = {MAX_FAILURES})")
    assert attempts == MAX_FAILURES + 1
    history = mlflow_client(faulty_sweep["url"]).get_metric_history(failed_run.info.run_id, "train/loss")
    assert [point.step for point in history] == [1]


# ---- item 3 ---------------------------------------------------------------------------------------

def test_a_killed_driver_resumes_every_trial_once_with_one_mlflow_run_each_none_running(faulty_sweep):
    ids, before = faulty_sweep["ids"], faulty_sweep["before_resume"]
    finished, interrupted = ids[KILLED_WORKER_LR], ids[KILLED_DRIVER_LR]
    assert before["states"][finished] == "TERMINATED" and before["states"][interrupted] == "RUNNING"
    assert interrupted in before["running_runs"], "the killed driver left the running trial's run RUNNING"

    states = experiment_trial_states(faulty_sweep["tune_root"])
    assert states == {ids[NAN_LR]: "ERROR", finished: "TERMINATED", interrupted: "TERMINATED"}
    for trial_id in (ids[NAN_LR], finished):  # not run again: not one more result
        assert tune_results(faulty_sweep["tune_root"] / trial_id) == before["results"][trial_id]
    killed_at = faulty_sweep["faults"]["driver_killed_at"]
    killed = faulty_sweep["faults"]["driver_killed"]  # Tune's results and Train's checkpoints when the driver died
    last_checkpoint = max(killed["checkpoints"])
    run = run_of(faulty_sweep, interrupted)
    # Tune's results (every step reported): those after the kill are the resumed run's
    resumed = [r["step"] for r in tune_results(faulty_sweep["tune_root"] / interrupted) if r["timestamp"] > killed_at]
    print(f"driver killed after step {killed['results'][-1]['step']} (newest checkpoint: step {last_checkpoint}); "
          f"--resume continued at step {resumed[0]}")
    assert resumed == list(range(last_checkpoint + 1, MAX_STEPS + 1)), "not resumed from its last checkpoint"
    # the trial's curve: every step once, those trained twice (after the checkpoint, before the kill) included
    history = mlflow_client(faulty_sweep["url"]).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(point.step for point in history) == list(range(1, MAX_STEPS + 1))

    runs = faulty_sweep["runs"]
    trial_runs = [r for r in runs if r.data.tags.get("dpo.role") == "trial"]
    assert sorted(r.data.tags["trial_id"] for r in trial_runs) == sorted(ids.values())  # one run per trial
    assert len([r for r in runs if r.data.tags.get("dpo.role") == "parent"]) == 1
    statuses = {r.data.tags.get("trial_id", "parent"): r.info.status for r in runs}
    assert statuses == {"parent": "FINISHED", ids[NAN_LR]: "FAILED", finished: "FINISHED", interrupted: "FINISHED"}
    finished_history = mlflow_client(faulty_sweep["url"]).get_metric_history(run_of(faulty_sweep, finished).info.run_id,
                                                                             "train/loss")
    assert all(point.timestamp < killed_at * 1000 for point in finished_history), "the finished trial ran after --resume"


# ---- item 8 ---------------------------------------------------------------------------------------

def test_the_local_ray_and_the_mlflow_server_listen_on_loopback_only(faulty_sweep):
    listening = faulty_sweep["faults"]["listening"]
    assert any("gcs_server" in title for title in listening) and any("raylet" in title for title in listening), listening
    assert any("mlflow" in title or "uvicorn" in title for title in listening), listening
    exposed = {title: addresses - LOOPBACK for title, addresses in listening.items() if addresses - LOOPBACK}
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


# ---- item 1 for trials of several workers (Ray Train): used by tests/test_fsdp_sweep.py ----------


def kill_one_worker_past_a_checkpoint(sweep: subprocess.Popen, tune_root: Path, trials_storage: Path,
                                      deadline: float, log: Path) -> dict[str, Any]:
    """SIGKILLs one of the trial's two RayTrainWorkers once Tune has a report after its newest registered
    checkpoint, so that the restarted group redoes at least one step; returns what was recorded then."""
    driver = psutil.Process(sweep.pid)
    while True:
        assert sweep.poll() is None, f"the sweep ended before a worker was killed:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"no checkpoint to kill after:\n{log_tail(log)}"
        trial_id = next(iter(trial_ids_by_learning_rate(tune_root).values()), None)
        workers = train_workers(driver.children(recursive=True), "train")
        if trial_id and len(workers) == 2 and past_first_checkpoint(tune_results(tune_root / trial_id)):
            for worker in workers:
                worker.suspend()  # frozen, so what Tune and Ray Train have recorded is all they get from them
            state = settled(tune_root, trial_id, trials_storage / trial_id)
            if state["checkpoints"] and state["results"][-1]["step"] > max(state["checkpoints"]):
                os.kill(workers[1].pid, signal.SIGKILL)
                workers[0].resume()  # the survivor is stopped by Ray Train, as after any lost worker
                return {"trial_id": trial_id, "worker_pids": [worker.pid for worker in workers], **state}
            for worker in workers:  # the newest report is the checkpoint's own: let one more step through
                worker.resume()
        time.sleep(0.02)
