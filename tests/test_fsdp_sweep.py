"""`dpo sweep` with FSDP workers on the embedded default (issue 19): sharded checkpoints, a killed worker, export.

The shipped configs/quickstart.yaml, shortened with --set to one trial of 16 steps of 8 pairs, runs with
`resources.num_workers: 2` and `resources.strategy: fsdp` (a TorchTrainer of 2 gloo workers, the policy
loaded sharded) and `failure.max_failures: 2`. Two faults hit the trial:
1) once Ray Train has registered a checkpoint and the trial has reported a step after it, the test SIGKILLs
   one RayTrainWorker process (tests/test_reliability_ray.py's procedure). Ray Train must restart the worker
   group from that checkpoint, which is in the sharded format (torch.distributed.checkpoint, one file per
   worker), and redo the lost steps with the values of the first attempt (1e-5);
2) once the new group has reported a step that is no checkpoint step, one of its workers gets SIGTERM (a
   preempted node). Both workers must agree on the step boundary to stop at, write the sharded checkpoint
   of that step and report it, and end with Preempted; the signalled process exits, and Ray Train restarts
   the group from that checkpoint, so no step is trained twice.
The trial must then finish. `dpo export` of the sweep must consolidate the chosen sharded checkpoint into a
Hugging Face folder that from_pretrained loads, holding the checkpoint's weights.
The embedded default's LM head is tied to its embedding, which FSDP loading used to untie (the first
checkpoint then failed in get_state_dict).
The demo assets come from the session's shared cache (tests/conftest.py: demo_cache), built once per session.
Run: `python -m pytest tests/test_fsdp_sweep.py -q -s`. Its cost is Ray Train's start-up, the embedded MLflow
server and, when no earlier test of the session built them, the demo assets: 276 s alone on 2 shared cores
(load average 4-8), of which 76 s were the demo assets, 150 s the sweep (81 s Ray Train's start) and 30 s export,
when only the SIGKILL was tested; with the SIGTERM too, 142 s on an idle machine with the demo assets cached.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.test_reliability_ray import (REPO, TOLERANCE, kill_one_worker_past_a_checkpoint, kill_process_tree,
                                        log_tail, registered_checkpoint_steps, train_workers, tune_results)

STEPS, CHECKPOINT_EVERY = 16, 5
SHORTENED = ["resources.num_workers=2", "resources.cpus_per_worker=1", "resources.strategy=fsdp",
             f"train.max_steps={STEPS}", "train.batch_size=8", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.eval_every=6",
             "train.log_every=1", "sweep.max_trials=1", "failure.max_failures=2"]


def sigterm_one_worker_past(sweep: subprocess.Popen, tune_root: Path, trials_storage: Path, killed: dict[str, Any],
                            deadline: float, log: Path) -> dict[str, Any]:
    """Once the group that replaced the killed worker has reported a step that is not a checkpoint step, sends
    SIGTERM to one of its two workers (both frozen meanwhile, so the signal lands inside a step). Every worker
    must then checkpoint the step in progress (a step no multiple of checkpoint_every), report it and stop, the
    signalled process must exit, and Ray Train must restart the group from that checkpoint."""
    driver, trial_id = psutil.Process(sweep.pid), killed["trial_id"]
    first_group = set(killed["worker_pids"])
    while True:
        assert sweep.poll() is None, f"the sweep ended before the SIGTERM:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"the restarted group reported no step to stop after:\n{log_tail(log)}"
        workers = [w for w in train_workers(driver.children(recursive=True), "train") if w.pid not in first_group]
        results = tune_results(tune_root / trial_id)
        restarted = [r["step"] for r in results[len(killed["results"]):]]
        if len(workers) == 2 and restarted and restarted[-1] % CHECKPOINT_EVERY and restarted[-1] <= STEPS - 5:
            for worker in workers:
                worker.suspend()
            signalled_after = tune_results(tune_root / trial_id)[-1]["step"]
            os.kill(workers[1].pid, signal.SIGTERM)
            for worker in workers:
                worker.resume()
            workers[1].wait(timeout=120)  # the signalled worker exits once its checkpoint is reported
            break
        time.sleep(0.02)
    ray_log = tune_root / "console.log"  # the workers' errors, as Ray Train logged them (not shown on the console)
    pattern, until = rf"training stopped by SIGTERM after step (\d+) of {STEPS}", time.monotonic() + 60
    while not re.findall(pattern, ray_log.read_text()) and time.monotonic() < until:  # Ray's log monitor lags a little
        time.sleep(0.2)
    stopped = re.findall(pattern, ray_log.read_text())
    assert stopped, f"no worker ended with Preempted:\n{log_tail(ray_log)}"
    assert len(set(stopped)) == 1, stopped  # every rank stopped after the same step
    stop = int(stopped[0])
    checkpoints = registered_checkpoint_steps(tune_root, trial_id, trials_storage / trial_id)
    assert signalled_after <= stop < STEPS and stop in checkpoints, (signalled_after, stop, checkpoints)
    return {"signalled_after": signalled_after, "stop_checkpoint": stop}


@pytest.mark.integration
@pytest.mark.ray
def test_an_fsdp_sweep_checkpoints_sharded_survives_a_killed_worker_and_exports(tmp_path, demo_cache):
    from transformers import AutoModelForCausalLM

    from orchestrator.config.layout import mlflow_root
    from orchestrator.tracking.server import EmbeddedServer
    from trainables.checkpointing import is_sharded_checkpoint
    from trainables.sharded_checkpoint import load_sharded_state

    storage = tmp_path / "runs"
    sets = [f"storage_path={storage}", f"output_dir={tmp_path / 'out'}", f"reference.cache_dir={tmp_path / 'cache'}",
            *SHORTENED]
    flags = [part for key_value in sets for part in ("--set", key_value)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1", "DPO_DEMO_CACHE": str(demo_cache),
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "orchestrator"]
    tune_root, trials_storage, log = storage / "quickstart", storage / "quickstart-trials", tmp_path / "sweep.log"
    sweep = subprocess.Popen([*command, "sweep", str(REPO / "configs/quickstart.yaml"), *flags], cwd=tmp_path, env=env,
                             stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            killed = kill_one_worker_past_a_checkpoint(sweep, tune_root, trials_storage, time.monotonic() + 400, log)
            preempted = sigterm_one_worker_past(sweep, tune_root, trials_storage, killed, time.monotonic() + 400, log)
            assert sweep.wait(timeout=400) == 0, log_tail(log)
        finally:
            if sweep.poll() is None:
                kill_process_tree(psutil.Process(sweep.pid))

        summary = json.loads((tune_root / "sweep_summary.json").read_text())
        [trial] = summary["trials"]
        assert trial["error"] is None and trial["step"] == STEPS, trial
        before = {r["step"]: r for r in killed["results"]}
        last_checkpoint, k = max(killed["checkpoints"]), max(before)
        results = tune_results(tune_root / killed["trial_id"])
        steps = [r["step"] for r in results]
        stopped_at = preempted["stop_checkpoint"]
        print(f"worker killed after step {k}; the group restarted from the sharded checkpoint of step {last_checkpoint}; "
              f"SIGTERM to one worker after step {preempted['signalled_after']}: every worker checkpointed step "
              f"{stopped_at} and the group went on from it")
        # after the SIGTERM no step is trained twice: the group's stop checkpoint is the step it stopped after
        assert steps == list(range(1, k + 1)) + list(range(last_checkpoint + 1, STEPS + 1)), steps
        for again in (r for r in results[k:] if r["step"] <= k):  # redone after the restart: the same values
            for key in ("train/loss", "train/reward_margin", "train/grad_norm"):
                assert math.isclose(again[key], before[again["step"]][key], abs_tol=TOLERANCE), (again["step"], key)

        checkpoints = sorted(p.parent for p in (trials_storage / killed["trial_id"]).rglob("manifest.json"))
        assert checkpoints and all(is_sharded_checkpoint(c) for c in checkpoints), checkpoints
        assert {json.loads((c / "manifest.json").read_text())["world_size"] for c in checkpoints} == {2}

        out = tmp_path / "model"
        export = subprocess.run([*command, "export", str(REPO / "configs/quickstart.yaml"), *flags, "--out", str(out)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
        chosen = Path(json.loads((out / "dpo_lineage.json").read_text())["checkpoint"]["path"])
        assert is_sharded_checkpoint(chosen)
        exported = AutoModelForCausalLM.from_pretrained(out)
        expected = AutoModelForCausalLM.from_pretrained(out)
        for parameter in expected.parameters():  # not what was exported: the weights must come from the checkpoint
            torch.nn.init.zeros_(parameter)
        load_sharded_state(chosen, expected)
        tokens = torch.tensor([[1, 5, 9, 12, 7, 4]])
        with torch.no_grad():
            difference = (exported(input_ids=tokens).logits - expected(input_ids=tokens).logits).abs().max()
        assert float(difference) < 1e-5, float(difference)
    finally:
        EmbeddedServer(mlflow_root(str(storage))).stop()  # the server `dpo sweep` started for this storage path
