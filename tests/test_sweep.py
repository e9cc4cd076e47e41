"""`dpo sweep` on a real local Ray: DDP equivalence, a two-node cluster, the incremental beta climb in warm
trials, concurrent trials, two sweeps on one machine at once.

Killed drivers, killed workers and failing trials (with --resume) are in tests/test_reliability_ray.py.

Every Ray test starts its own Ray (or local cluster) and stops it, and writes only under pytest's tmp
folders (Tune storage, reference cache, demo assets). Models are the tiny ones of tests/tiny_world.py,
trained for a few steps; most of the time is Ray start-up and the first import of torch in a trial actor.
Run: `python -m pytest tests/test_sweep.py -q --durations=10` (about 5 minutes on 2 CPU cores);
only the Ray-free checks: `python -m pytest tests/test_sweep.py -m "not ray" -q`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.config import ConfigError, ExperimentConfig, load_config
from orchestrator.config.layout import StorageLayout, find_checkpoints, mlflow_root
from orchestrator.config.spec import resolve_experiment, resolve_run
from orchestrator.ray.cluster import check_cluster_fits, start_ray
from orchestrator.ray.trial import WorkerJob
from orchestrator.workflows.sweep import run_sweep as run_resolved_sweep


def run_sweep(config: ExperimentConfig, **options: Any) -> dict[str, Any]:
    """`dpo sweep` of a validated config: resolved once, as the CLI does."""
    return run_resolved_sweep(resolve_experiment(config), **options)
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # CPU float32: 2 DDP workers vs 1 process, same global batch


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama, 32 training pairs and 8 held-out pairs (the model is shared by all tests)."""
    root = tmp_path_factory.mktemp("sweep-world")
    model_dir = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 32, seed=1))
    eval_ = write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))
    return {"model": str(model_dir), "train": str(train), "eval": str(eval_)}


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """Demo assets and anything else cached by name go to this test's tmp folder, never ~ or the repo."""
    monkeypatch.setenv("DPO_DEMO_CACHE", str(tmp_path / "demo-cache"))


def tiny_raw(world: dict[str, str], tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw config on the tiny world with every output in tmp_path; `sections` update its sections."""
    raw: dict[str, Any] = {
        "name": "tiny", "output_dir": str(tmp_path / "outputs"), "storage_path": str(tmp_path / "runs"),
        "model": {"path": world["model"]},
        "data": {"train": world["train"], "eval": world["eval"], "max_length": 48},
        "dpo": {"beta": 0.1},
        "train": {"learning_rate": 5e-3, "batch_size": 8, "max_steps": 4, "warmup_steps": 0, "log_every": 1,
                  "eval_every": 4, "checkpoint_every": 4, "device": "cpu"},
        "reference": {"cache_dir": str(tmp_path / "reference-cache")},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"enabled": False},  # MLflow is covered by tests/test_tracking.py and the incremental test
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def tiny_config(world: dict[str, str], tmp_path: Path, **sections: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_raw(world, tmp_path, **sections))


# ---- no Ray needed --------------------------------------------------------------------------------

def test_a_trial_larger_than_the_cluster_is_a_config_error(world, tmp_path):
    fits = tiny_config(world, tmp_path, resources={"num_workers": 2, "cpus_per_worker": 1})
    check_cluster_fits(resolve_run(fits).resources, {"CPU": 2.0})  # exactly full is fine

    too_many_workers = tiny_config(world, tmp_path, resources={"num_workers": 4, "cpus_per_worker": 1})
    with pytest.raises(ConfigError, match=r"num_workers x resources.cpus_per_worker = 4 CPUs, the cluster has 2"):
        check_cluster_fits(resolve_run(too_many_workers).resources, {"CPU": 2.0})

    too_many_gpus = tiny_config(world, tmp_path, resources={"num_workers": 2, "use_gpu": True})
    with pytest.raises(ConfigError, match=r"use_gpu: 2 GPUs needed, the cluster has 1"):
        check_cluster_fits(resolve_run(too_many_gpus).resources, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"the cluster has 0"):
        check_cluster_fits(resolve_run(too_many_gpus).resources, {"CPU": 8.0})  # a CPU-only cluster


def test_an_incremental_round_may_have_all_its_trials_pending_at_once_unless_the_user_limits_it(world, tmp_path, monkeypatch):
    """Tune allows a searcher other than its own one pending trial; the incremental round's fan-out would then
    be placed one trial at a time (test_trials_that_fit_together_run_at_the_same_time runs it)."""
    import os

    from orchestrator.ray.tuner import pending_trials, tune_pending_trials

    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    fan_out = resolve_experiment(tiny_config(world, tmp_path, sweep={
        "strategy": "incremental_beta", "learning_rate": [5e-3, 4e-3, 3e-3], "kl_weight": [0.0, 0.1]})).sweep
    assert pending_trials(fan_out) == 6
    with tune_pending_trials(fan_out):
        assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "6"
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # restored: the next sweep of a study decides again
    limited = resolve_experiment(tiny_config(world, tmp_path, sweep={
        "strategy": "incremental_beta", "learning_rate": [5e-3, 4e-3], "max_concurrent_trials": 1})).sweep
    assert pending_trials(limited) is None  # Tune's ConcurrencyLimiter then sets it
    grid = resolve_experiment(tiny_config(world, tmp_path, sweep={"strategy": "grid", "beta": [0.1, 0.2]})).sweep
    assert pending_trials(grid) is None
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "2")
    with tune_pending_trials(fan_out):
        assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "2"  # the user's own value wins


def test_one_worker_trials_run_warm_and_the_layout_knows_where_their_checkpoints_are(world, tmp_path):
    warm = resolve_experiment(tiny_config(world, tmp_path))
    train = resolve_experiment(tiny_config(world, tmp_path, resources={"num_workers": 2, "cpus_per_worker": 1}))
    assert warm.sweep.trial_mode == warm.layout.trial_mode == "warm"
    assert train.sweep.trial_mode == train.layout.trial_mode == "train"
    runs = tmp_path / "runs"
    assert warm.layout.trial_dir("t1") == f"{runs}/tiny/t1"  # Tune's trial folder: checkpoint_000000/, ...
    assert train.layout.trial_dir("t1") == f"{runs}/tiny-trials/t1"  # the trial's TorchTrainer run

    unknown = StorageLayout.of(str(runs), "tiny")  # what `dpo export --storage-path` builds: the mode from disk
    assert unknown.trial_dir("t1") == f"{runs}/tiny/t1" and unknown.ran_trials_as() is None
    checkpoint = runs / "tiny" / "t1" / "checkpoint_000001"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 4}))
    assert unknown.ran_trials_as() == "warm"
    assert find_checkpoints(Path(unknown.trial_dir("t1"))) == [(4, checkpoint)]
    (runs / "tiny-trials" / "t1").mkdir(parents=True)
    assert unknown.ran_trials_as() == "train" and unknown.trial_dir("t1") == f"{runs}/tiny-trials/t1"


# ---- real Ray -------------------------------------------------------------------------------------

@pytest.fixture
def local_ray():
    """Stops the Ray this test starts (start_ray / run_sweep), even when the test fails."""
    import ray

    yield
    ray.shutdown()


@pytest.mark.ray
def test_two_ddp_workers_give_the_losses_of_one_worker(world, tmp_path, local_ray):
    """The same global batch of 8 pairs, split 4 + 4 over two DDP ranks (with gradient accumulation)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray.trial import train_worker
    from trainables.entrypoints import run_dpo

    steps = 4
    config = tiny_config(world, tmp_path, dpo={"beta": 0.1, "kl_weight": 0.5},
                         train={"max_steps": steps, "micro_batch_size": 2, "eval_every": 2, "checkpoint_every": 1},
                         resources={"num_workers": 2, "cpus_per_worker": 1})

    one_worker: list[dict[str, Any]] = []  # the engine in this process, as `dpo train` runs it
    one = resolve_run(config, output_dir=str(tmp_path / "one-worker"), show_progress=False)
    run_dpo(one.model, one.data, one.preference, one.loop, one.runtime, lambda metrics, _: one_worker.append(metrics))

    start_ray(None, resolve_run(config).resources)
    trainer = TorchTrainer(  # what orchestrator.ray.trial.run_trial builds, without the Tune wrapper
        train_worker,
        train_loop_config={"job": WorkerJob(spec=resolve_experiment(config).run)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        # A checkpoint every step keeps every step's metrics in Result.metrics_dataframe.
        run_config=RunConfig(name="two-workers", storage_path=str(tmp_path / "train-runs"),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    two_workers = result.metrics_dataframe.sort_values("step").to_dict("records")

    assert [row["step"] for row in two_workers] == [row["step"] for row in one_worker] == list(range(1, steps + 1))
    compared = ["train/loss", "train/preference_loss", "train/kl", "train/grad_norm", "train/reward_margin",
                "eval/loss", "eval/preference_accuracy"]
    for single, ddp in zip(one_worker, two_workers):
        for key in compared:
            if key in single:
                assert math.isclose(ddp[key], single[key], abs_tol=TOLERANCE), (
                    f"step {single['step']} {key}: 2 workers {ddp[key]!r} vs 1 worker {single[key]!r}")
    assert one_worker[-1]["train/loss"] < one_worker[0]["train/loss"] - 0.01  # the steps really trained
    assert one_worker[-1]["train/kl"] > 0  # so the KL term and its token normalisation are compared too


@pytest.fixture
def two_node_cluster():
    """Two Ray nodes of 1 CPU each on this machine (ray.cluster_utils), removed after the test.

    Both nodes listen on 127.0.0.1 only (orchestrator.ray.cluster.bind_local_ray_to_loopback: otherwise Ray 2.60
    rewrites 127.0.0.1 to the machine's routable address).
    """
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.ray.cluster import bind_local_ray_to_loopback

    bind_local_ray_to_loopback()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.ray
def test_a_trial_spreads_its_two_workers_over_two_nodes(world, tmp_path, two_node_cluster):
    config = tiny_config(world, tmp_path, name="two-nodes", sweep={"strategy": "grid", "beta": [0.1]},
                         resources={"num_workers": 2, "cpus_per_worker": 1})

    summary = run_sweep(config, address=two_node_cluster.address)

    [trial] = summary["trials"]
    assert trial["error"] is None
    assert trial["step"] == config.train.max_steps
    assert summary["best"]["trial_id"] == trial["trial_id"]
    nodes = {node["NodeID"] for node in two_node_cluster.global_state.node_table() if node["Alive"]}
    workers = [actor for actor in two_node_cluster.global_state.actor_table(None).values()
               if actor["ActorClassName"] == "RayTrainWorker"]
    assert len(workers) == 2
    assert {actor["Address"]["NodeID"] for actor in workers} == nodes and len(nodes) == 2
    assert {node["NodeManagerAddress"] for node in two_node_cluster.global_state.node_table()} == {"127.0.0.1"}


@pytest.mark.ray
def test_incremental_beta_starts_at_01_climbs_and_stops_by_its_rule(tmp_path, local_ray):
    """The embedded default's task, shortened: 2 rounds at most (beta 0.1, then 0.2). DPO from the random-init
    demo:model at the learning rate 1e-3 the quickstart used before it started from demo:sft_model: in 24
    steps beta 0.2 learns more than 0.1 there. From the SFT model at lr 1e-4, 24 steps barely move either
    (one run: beta 0.2 no better than 0.1, then the procedure explored down to 0.05 and 0.02)."""
    config = load_config(REPO / "configs/quickstart.yaml", [
        "model.path=demo:model", "train.learning_rate=1e-3", "dpo.kl_weight=0",
        f"output_dir={tmp_path / 'outputs'}", f"storage_path={tmp_path / 'runs'}",
        "train.max_steps=24", "train.warmup_steps=4", "train.log_every=3", "train.eval_every=24",
        "train.checkpoint_every=24", "train.eval_batch_size=64",
        "sweep.max_beta=0.2", "sweep.patience=1", "sweep.max_trials=4",
    ])

    from orchestrator.tracking.server import EmbeddedServer

    try:
        summary = run_sweep(config)  # tracking on: the embedded MLflow server under storage_path
        check_mlflow_runs(summary)
    finally:
        EmbeddedServer(mlflow_root(config.storage_path)).stop()

    log = summary["decision_log"]
    assert log, "the searcher's decision log is empty"
    assert log[0]["round"] == 1 and log[0]["beta"] == pytest.approx(0.1)
    assert log[0]["action"] == "climb", log[0]["reason"]
    betas = [entry["beta"] for entry in log]
    assert all(later > earlier for earlier, later in zip(betas, betas[1:])), betas
    assert log[-1]["action"] == "stop"
    assert "patience" in log[-1]["reason"] or "upper bound" in log[-1]["reason"], log[-1]["reason"]
    assert all(entry["action"] != "stop" for entry in log[:-1])
    assert len(summary["trials"]) == len(log) >= 2  # one (learning_rate, kl_weight) pair: one trial per round
    assert sorted(t["config"]["beta"] for t in summary["trials"]) == pytest.approx(betas)
    assert all(t["error"] is None and t["step"] == 24 for t in summary["trials"])
    assert summary["trial_mode"] == "warm"  # one worker per trial: the engine in Tune's reused trial actor
    for trial in summary["trials"]:  # the start-up breakdown: measured, and within the trial's own time
        assert trial["ray_train_start_seconds"] is None, trial  # no Ray Train job starts for a warm trial
        startup = [trial["reference_wait_seconds"], trial["load_seconds"]]
        assert trial["load_seconds"] > 0.0 and trial["trial_started_at"] > 0.0, trial
        assert sum(startup) + trial["step_seconds"] + trial["eval_seconds"] <= trial["trial_seconds"] + 0.5, trial
    later = sorted(summary["trials"], key=lambda t: t["trial_started_at"])[1:]
    first = min(summary["trials"], key=lambda t: t["trial_started_at"])
    assert all(t["load_seconds"] < first["load_seconds"] for t in later), (  # torch & co. imported once per actor
        [t["load_seconds"] for t in summary["trials"]])
    layout = resolve_experiment(config).layout
    for trial in summary["trials"]:  # each warm trial's checkpoints, where the layout (and export, study) look
        assert [step for step, _ in find_checkpoints(Path(layout.trial_dir(trial["trial_id"])))] == [24], trial


def check_mlflow_runs(summary: dict[str, Any]) -> None:
    """One FINISHED parent run with the decision log, one FINISHED child per trial with metric curves."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["mlflow"]["uri"])
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["reference_cache_key"] == summary["reference_cache_key"] != ""
    assert "decision_log.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(t["trial_id"] for t in summary["trials"])
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"beta", "kl_weight", "learning_rate"} <= set(child.data.params)
        assert child.data.tags["dpo.stage"] == "dpo"
        curve = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(curve) >= 8 and "eval/preference_accuracy" in child.data.metrics
        assert child.data.metrics["perf/load_seconds"] > 0.0
        assert find_checkpoints(Path(child.data.tags["checkpoint_dir"])), child.data.tags["checkpoint_dir"]



@pytest.mark.ray
def test_a_failing_reference_task_stops_the_sweep_and_raises_its_error(world, tmp_path, local_ray):
    """Trials start while the reference task runs; when it fails, no further trial starts and run_sweep
    raises the task's own error (not a trial's)."""
    import shutil

    broken = tmp_path / "broken-reference"
    shutil.copytree(world["model"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = tiny_config(world, tmp_path, reference={"cache_dir": str(tmp_path / "reference-cache"), "path": str(broken)},
                         sweep={"max_trials": 4}, resources={"num_workers": 1, "cpus_per_worker": 2})
    with pytest.raises(Exception, match="safetensors|header|deserializ") as raised:
        run_sweep(config)
    assert "Trial" not in type(raised.value).__name__, raised.value
    # warm trials: each started trial has a Tune folder (the reference cache is elsewhere in this config)
    trainer_runs = [p.name for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir() and p.name != "data"]
    assert len(trainer_runs) <= 1, f"trials went on after the reference task failed: {trainer_runs}"

    # The next sweep of this process (a study runs several) is not stopped by that failure, also without a
    # reference task of its own.
    after = tiny_config(world, tmp_path, name="after", reference={"mode": "live"},
                        sweep={"strategy": "grid", "beta": [0.1]})
    [trial] = run_sweep(after)["trials"]
    assert trial["error"] is None and trial["step"] == after.train.max_steps, trial


# ---- concurrency ----------------------------------------------------------------------------------

def overlap_seconds(trials: list[dict[str, Any]]) -> float:
    """How long every trial ran at the same time: from the last start to the first last report (<= 0: never)."""
    starts = [t["trial_started_at"] for t in trials]
    ends = [t["trial_started_at"] + t["trial_seconds"] for t in trials]
    return min(ends) - max(starts)


@pytest.mark.ray
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two trials of one CPU each need two CPUs")
@pytest.mark.parametrize("sweep", [
    {"strategy": "grid", "beta": [0.1, 0.2]},
    {"strategy": "incremental_beta", "learning_rate": [5e-3, 4e-3], "max_trials": 2},  # one round, fanned out
], ids=["grid", "incremental-fan-out"])
def test_trials_that_fit_together_run_at_the_same_time(world, tmp_path, local_ray, sweep):
    """Two CPUs, one CPU per trial: both trials of a grid, or of one incremental round, run at once, each in
    its own trial actor (a live reference, so that no reference task holds a CPU while they start).

    The proof is the trial actors' process ids (Tune records `pid` with every result): Tune reuses a finished
    trial's actor for the next trial (reuse_actors; the ASHA test below checks it), so trials run one after
    the other share one process, and only a trial placed while the other still held its CPU gets its own.
    Wall-clock overlap is printed, not asserted: a fresh-clone CI run under load failed on it. Each actor
    starts and imports torch before its trial function starts, and how long that takes varies with load:
    on 2026-12-02, at a load average of 15-27 on 2 cores, the two trial functions of the fan-out started
    82 s apart, against 92 and 130 s per trial, so a little more skew leaves no overlap at all."""
    config = tiny_config(world, tmp_path, sweep=sweep, reference={"mode": "live"},
                         train={"max_steps": 40, "eval_every": 20, "checkpoint_every": 20},
                         resources={"num_workers": 1, "cpus_per_worker": 1})

    summary = run_sweep(config)

    trials = summary["trials"]
    assert len(trials) == 2 and all(t["error"] is None and t["step"] == 40 for t in trials), trials
    pids = {t["trial_id"]: {json.loads(line)["pid"] for line in (Path(t["path"]) / "result.json").read_text().splitlines()}
            for t in trials}
    print(f"trial actors {pids}; the trials' functions overlapped for {overlap_seconds(trials):.1f} s")
    assert all(len(found) == 1 for found in pids.values()), pids  # one actor per trial (no retry here)
    assert len(set.union(*pids.values())) == 2, f"both trials ran in one actor, one after the other: {pids}"
    if sweep["strategy"] == "incremental_beta":
        assert {t["config"]["learning_rate"] for t in trials} == {5e-3, 4e-3}
        assert {t["config"]["round"] for t in trials} == {1}


def gcs_servers(process: psutil.Process) -> list[int]:
    """The GCS server processes among a process's descendants: one per Ray instance it started."""
    try:
        return [child.pid for child in process.children(recursive=True) if "gcs_server" in child.name()]
    except psutil.Error:
        return []


@pytest.mark.ray
def test_two_sweeps_started_together_on_one_machine_both_finish(world, tmp_path):
    """Two `dpo sweep` commands at once, each with its own local Ray, both finish with their own results: a
    warm sweep and a Ray Train one (the mechanism is tested deterministically by the test below)."""
    configs = {
        "warm-a": tiny_raw(world, tmp_path / "a", name="warm-a", sweep={"strategy": "grid", "beta": [0.1]}),
        "train-b": tiny_raw(world, tmp_path / "b", name="train-b", sweep={"strategy": "grid", "beta": [0.2]},
                            resources={"num_workers": 2, "cpus_per_worker": 1}),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "DPO_DEMO_CACHE": str(tmp_path / "demo-cache")}
    processes, logs = {}, {}
    for name, raw in configs.items():
        (tmp_path / name).mkdir()
        config_file = tmp_path / name / "config.yaml"
        config_file.write_text(json.dumps(raw))  # JSON is YAML
        logs[name] = tmp_path / name / "sweep.log"
        processes[name] = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(config_file)],
                                           cwd=tmp_path / name, env=env, stdout=logs[name].open("w"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
    both_rays_up = False
    deadline = time.monotonic() + 600
    try:
        while any(process.poll() is None for process in processes.values()):
            assert time.monotonic() < deadline, "the two sweeps did not finish in 10 minutes"
            servers = [gcs_servers(psutil.Process(process.pid)) for process in processes.values() if process.poll() is None]
            both_rays_up = both_rays_up or (len(servers) == 2 and all(len(found) == 1 for found in servers))
            time.sleep(0.2)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    for name, process in processes.items():
        log = logs[name].read_text(errors="replace")
        assert process.returncode == 0, f"{name}:\n{log[-5000:]}"
        assert "Found multiple active Ray instances" not in log, f"{name}:\n{log[-5000:]}"
        summary = json.loads((Path(configs[name]["storage_path"]) / name / "sweep_summary.json").read_text())
        [trial] = summary["trials"]
        assert trial["error"] is None and trial["step"] == 4, trial
        assert summary["trial_mode"] == ("warm" if name == "warm-a" else "train")
        assert summary["best"]["trial_id"] == trial["trial_id"]
    assert both_rays_up, "the two sweeps never ran their own local Ray at the same time"


@pytest.fixture
def another_local_ray(tmp_path):
    """A local Ray of another process (as another `dpo sweep` would run), up for the test; yields its address."""
    script = ("import ray, sys, time\n"
              "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
              "print(ray.get_runtime_context().gcs_address, flush=True)\n"
              "time.sleep(600)\n")
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=tmp_path, start_new_session=True)
    try:
        yield other.stdout.readline().strip()
    finally:
        other.kill()
        other.wait(timeout=60)


@pytest.mark.ray
def test_a_local_ray_started_next_to_another_is_its_own_and_its_workers_find_it(world, tmp_path, local_ray,
                                                                                 another_local_ray, monkeypatch):
    """start_ray never joins another command's local Ray (a plain ray.init() would join the one RAY_ADDRESS or
    Ray's address file names, and fail: "num_cpus ... must not be provided"), and its workers look their own
    cluster up: Ray Train's placement-group cleaner asks the state API, which without an address scans the
    machine and raises "Found multiple active Ray instances" next to another Ray, ending its watch."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", another_local_ray)  # what a plain ray.init() would connect to
    start_ray(None, resolve_run(tiny_config(world, tmp_path)).resources)
    own = ray.get_runtime_context().gcs_address
    assert own != another_local_ray and ray.cluster_resources()["CPU"] == os.cpu_count()

    @ray.remote
    class Watched:
        def ready(self) -> bool:
            return True

    @ray.remote
    def cleaner_lookup(actor_id: str) -> tuple[str | None, str]:
        """What the placement-group cleaner does every few seconds, in a worker of this Ray."""
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException

        try:
            return os.environ.get("RAY_ADDRESS"), f"alive: {is_actor_alive(actor_id, timeout=10)}"
        except RayStateApiException as unavailable:  # no dashboard here: the cleaner logs it and keeps watching
            return os.environ.get("RAY_ADDRESS"), f"state API unavailable: {type(unavailable).__name__}"

    watched = Watched.remote()
    assert ray.get(watched.ready.remote())
    address, outcome = ray.get(cleaner_lookup.remote(watched._actor_id.hex()))
    assert address == own, (address, own)
    print(f"placement-group cleaner's lookup next to another local Ray: {outcome}")



@pytest.mark.ray
@pytest.mark.mlflow
def test_asha_stops_a_warm_trial_early_and_the_actor_runs_the_next_one(world, tmp_path, local_ray):
    """ASHA (on eval/loss, lower is better) stops the learning-rate-1e-7 trial at its first rung, because the
    first trial's loss there was lower: the stopped trial ends without error and its MLflow run KILLED; the
    next trial runs in the same, warm actor (no new imports)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.server import EmbeddedServer

    config = tiny_config(world, tmp_path, tracking={"enabled": True},
                         sweep={"strategy": "grid", "learning_rate": [5e-3, 1e-7, 4e-3], "scheduler": "asha",
                                "metric": "eval/loss", "mode": "min", "max_concurrent_trials": 1},
                         train={"max_steps": 40, "eval_every": 4, "checkpoint_every": 8, "log_every": 1},
                         resources={"num_workers": 1, "cpus_per_worker": 1})
    try:
        summary = run_sweep(config)
        client = MlflowClient(tracking_uri=summary["mlflow"]["uri"])
        parent = client.get_run(summary["mlflow"]["parent_run_id"])
        runs = {run.data.tags["trial_id"]: run for run in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    finally:
        EmbeddedServer(mlflow_root(config.storage_path)).stop()

    trials = sorted(summary["trials"], key=lambda t: t["trial_started_at"])
    assert [t["config"]["learning_rate"] for t in trials] == [5e-3, 1e-7, 4e-3]
    first, slow, after = trials
    assert all(t["error"] is None for t in trials), trials
    assert first["step"] == 40 and runs[first["trial_id"]].info.status == "FINISHED"
    assert slow["step"] < 40, slow  # stopped at a rung
    assert runs[slow["trial_id"]].info.status == "KILLED" and "error" not in runs[slow["trial_id"]].data.tags
    assert after["load_seconds"] < first["load_seconds"], (after["load_seconds"], first["load_seconds"])


@pytest.mark.ray
def test_with_fail_fast_a_trial_that_fails_for_good_stops_the_sweep(world, tmp_path, local_ray):
    """failure.fail_fast: a trial whose every attempt fails (a learning rate of 1e8: a non-finite loss from its first
    update; no restart here) stops the sweep, and the next grid point never trains. Without it the others go on:
    test_reliability_ray.py::test_an_error_on_every_attempt_ends_the_trial_after_max_failures_plus_one_attempts_and_the_sweep_goes_on."""
    sections = dict(sweep={"strategy": "grid", "beta": [0.1], "learning_rate": [1e8, 1e-3], "max_concurrent_trials": 1},
                    train={"max_steps": 6, "eval_every": 6, "checkpoint_every": 6}, reference={"mode": "live"})
    stopped = run_sweep(tiny_config(world, tmp_path, name="fail-fast", failure={"max_failures": 0, "fail_fast": True},
                                    **sections))
    [failed] = [t for t in stopped["trials"] if t["error"]]
    assert "NonFiniteLossError" in failed["error"] and failed["config"]["learning_rate"] == 1e8, failed
    assert not [t for t in stopped["trials"] if t["step"] == 6], stopped["trials"]  # the 1e-3 trial never finished


@pytest.mark.ray
def test_a_parent_run_that_cannot_be_opened_stops_the_sweep_with_its_error_and_no_trial_trains(world, tmp_path,
                                                                                              local_ray, monkeypatch):
    """A fresh sweep starts Tune while the driver opens its MLflow parent run (orchestrator/ray/handoff.py). When
    that fails, the trials that started wait for it, get the driver's error instead of a run, and the sweep stops
    with that error: no trial trains without its MLflow run."""
    import time

    import orchestrator.workflows.sweep as sweep_module

    def cannot_open(*args, **kwargs):
        time.sleep(5)  # long enough for Tune to have started the first trial, which must be waiting
        raise RuntimeError("the tracking server refused the parent run")

    monkeypatch.setattr(sweep_module, "open_sweep_run", cannot_open)
    config = tiny_config(world, tmp_path, tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                         sweep={"strategy": "grid", "beta": [0.1, 0.2]}, reference={"mode": "live"})
    import ray

    start_ray(None, resolve_run(config).resources)  # a Ray the sweep joins, as each sweep of a study does
    with pytest.raises(RuntimeError, match="refused the parent run"):
        run_sweep(config)
    results = [path for path in (tmp_path / "runs" / "tiny").glob("*/result.json") if path.read_text().strip()]
    assert not results, f"a trial reported without its MLflow run: {results}"
    assert ray.is_initialized()  # the joined Ray outlives the sweep, but not the sweep's handoff actor
    alive = [actor["ActorClassName"] for actor in ray._private.state.actors().values() if actor["State"] == "ALIVE"]
    assert not [name for name in alive if name.endswith("Handoff")], alive
