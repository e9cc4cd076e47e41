"""Node loss (issue 23, promise 1): a trial whose node dies continues on the surviving node from its checkpoint.

A two-node Ray cluster on this machine (ray.cluster_utils: a head and one worker node, both on
127.0.0.1, storage on local disk, which both nodes see since they are one machine; orchestrator/ray/
cluster.py treats such a cluster as one machine). The head's only CPU is held by a placeholder actor, so
the sweep's one warm trial (one worker, `failure.max_failures: 1`) starts on the worker node. Once Tune
has registered the trial's first checkpoint, the test frees the head's CPU and kills every process of the
worker node (`cluster.remove_node`, no graceful shutdown). The trial must be restarted on the head from
that checkpoint and end with the final metrics of the same training run uninterrupted in this process
(1e-6 on CPU), every step's train/loss included. The sweep runs through `run_sweep`, as `dpo sweep`
does, connected to the cluster; MLflow is off (the run records are tested in test_reliability_ray.py).
Run: `python -m pytest tests/test_chaos_node_loss.py -q` (86 s on 2 cores shared with other runs, load average 8).
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.config import ExperimentConfig
from orchestrator.config.spec import resolve_experiment
from tests.test_reliability_ray import FINAL_METRICS, tune_results, uninterrupted_run
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.timeout(400)]

TOLERANCE = 1e-6
CHECKPOINT_EVERY, MAX_STEPS, LEARNING_RATE = 5, 30, 5e-3


def assert_as_if_uninterrupted(results: list[dict[str, Any]], raw: dict[str, Any], folder: Path, what: str) -> None:
    """Every reported train/loss, and the final FINAL_METRICS, of an interrupted trial (`results`, Tune's rows)
    equal the same training run uninterrupted in one process, within TOLERANCE."""
    uninterrupted = uninterrupted_run(raw, raw["train"]["learning_rate"], folder)
    last = raw["train"]["max_steps"]
    for key in FINAL_METRICS:
        assert math.isclose(results[-1][key], uninterrupted[last][key], abs_tol=TOLERANCE), (
            f"{key}: {what} {results[-1][key]!r}, uninterrupted {uninterrupted[last][key]!r}")
    for result in results:
        assert math.isclose(result["train/loss"], uninterrupted[result["step"]]["train/loss"], abs_tol=TOLERANCE)


def sweep_config(root: Path) -> dict[str, Any]:
    """One grid trial on the tiny model: every step reported, a checkpoint every CHECKPOINT_EVERY steps."""
    return {
        "name": "node-loss", "output_dir": str(root / "outputs"), "storage_path": str(root / "runs"),
        "model": {"path": str(build_model_dir(root / "model", "llama"))},
        "data": {"train": str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 32, seed=1))),
                 "eval": str(write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))), "max_length": 48},
        "train": {"learning_rate": LEARNING_RATE, "batch_size": 8, "max_steps": MAX_STEPS, "warmup_steps": 0,
                  "log_every": 1, "eval_every": 10, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 2,
                  "max_grad_norm": None, "device": "cpu"},
        "reference": {"cache_dir": str(root / "reference-cache")},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "failure": {"max_failures": 1},
        "tracking": {"enabled": False},
        "sweep": {"strategy": "grid", "beta": [0.1], "max_concurrent_trials": 1},
    }


def trial_actors(node_pids: set[int]) -> list[psutil.Process]:
    """The warm trial actors (Ray titles them ray::ImplicitFunc...) among the descendants of `node_pids`."""
    found = []
    for pid in node_pids:
        try:
            for process in psutil.Process(pid).children(recursive=True):
                if "ImplicitFunc" in " ".join(process.cmdline()):
                    found.append(process)
        except psutil.Error:
            continue
    return found


def running(pid: int) -> bool:
    """Whether the process runs (a killed child that was not waited for yet is a zombie: not running)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_trial_whose_node_dies_goes_on_from_its_checkpoint_on_the_surviving_node(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.ray.cluster import bind_local_ray_to_loopback
    from orchestrator.workflows.sweep import run_sweep

    bind_local_ray_to_loopback()  # else Ray 2.60 replaces 127.0.0.1 by the machine's routable address
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    raw = sweep_config(tmp_path)
    experiment = resolve_experiment(ExperimentConfig.model_validate(raw))
    loopback = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **loopback})
    # two CPUs: the sweep's reference task and then its trial both run here while the head is full
    worker_node = cluster.add_node(num_cpus=2, **loopback)
    events: dict[str, Any] = {}
    try:
        ray.init(address=cluster.address)
        head_id = next(n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] and n["Resources"].get("CPU") == 1)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=1)
        class Placeholder:
            def ready(self) -> bool:
                return True

        placeholder = Placeholder.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
        ray.get(placeholder.ready.remote())
        worker_pids = {worker_node.all_processes["raylet"][0].process.pid}
        tune_root = Path(raw["storage_path"]) / "node-loss"

        def kill_worker_node_after_first_checkpoint() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                trials = [path.parent for path in tune_root.glob("*/params.json")]
                results = tune_results(trials[0]) if trials else []
                if any(r.get("checkpoint_dir_name") for r in results) and results[-1]["step"] > CHECKPOINT_EVERY:
                    actors = trial_actors(worker_pids)
                    events["trial_on_worker_node"] = len(actors) == 1
                    for actor in actors:
                        actor.suspend()  # no further step: what Tune has now is what the dead node gave it
                    time.sleep(2.5)  # Tune writes its experiment state every second here
                    events["steps_before_kill"] = [r["step"] for r in tune_results(trials[0])]
                    ray.kill(placeholder)  # the head's CPU is free for the restarted trial
                    cluster.remove_node(worker_node, allow_graceful=False)
                    events["killed_at"] = time.monotonic()
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_worker_node_after_first_checkpoint, daemon=True)
        killer.start()
        started = time.monotonic()
        summary = run_sweep(experiment)  # Tune in the main thread, as `dpo sweep` runs it
        killer.join(timeout=5)
        print(f"sweep with node loss: {time.monotonic() - started:.0f} s; steps before the kill "
              f"{events.get('steps_before_kill')}")
        worker_node_processes_left = [pid for pid in worker_pids if running(pid)]
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert events.get("trial_on_worker_node"), f"the trial did not run on the worker node: {events}"
    # the GCS may mark the node dead only after its health checks time out, later than the sweep ends: the fact
    # checked is that the node's raylet (and with it every process of that node) is gone
    assert not worker_node_processes_left, "the worker node's raylet survived remove_node"
    [trial_dir] = [path.parent for path in tune_root.glob("*/params.json")]
    results = tune_results(trial_dir)
    steps = [r["step"] for r in results]
    seen = events["steps_before_kill"]
    last_checkpoint = max(r["step"] for r in results[:len(seen)] if r.get("checkpoint_dir_name"))
    # the lost node trained steps 1..k; the trial went on from its newest checkpoint, on the head
    assert steps == seen + list(range(last_checkpoint + 1, MAX_STEPS + 1)), steps
    # after the kill another process, on the only node left (the head), trained the remaining steps
    assert {r["pid"] for r in results[len(seen):]}.isdisjoint({r["pid"] for r in results[:len(seen)]})
    assert CHECKPOINT_EVERY <= last_checkpoint <= seen[-1] < MAX_STEPS, "the node died before a checkpoint or after the end"
    [trial] = summary["trials"]
    assert trial["error"] is None and trial["step"] == MAX_STEPS, trial

    assert_as_if_uninterrupted(results, raw, tmp_path / "uninterrupted", "after node loss")
