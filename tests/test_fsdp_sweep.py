"""`dpo sweep` with FSDP workers on the embedded default (issue 19): sharded checkpoints, a killed worker, export.

The shipped configs/quickstart.yaml, shortened with --set to one trial of 12 steps of 8 pairs, runs with
`resources.num_workers: 2` and `resources.strategy: fsdp` (a TorchTrainer of 2 gloo workers, the policy
loaded sharded) and `failure.max_failures: 1`. Once Ray Train has registered a checkpoint and the trial has
reported a step after it, the test SIGKILLs one RayTrainWorker process (tests/test_reliability_ray.py's
procedure). Ray Train must restart the worker group from that checkpoint, which is in the sharded format
(torch.distributed.checkpoint, one file per worker), redo the lost steps with the values of the first
attempt (1e-5) and finish the trial. `dpo export` of the sweep must then consolidate the chosen sharded
checkpoint into a Hugging Face folder that from_pretrained loads, holding the checkpoint's weights.
The embedded default's LM head is tied to its embedding, which FSDP loading used to untie (the first
checkpoint then failed in get_state_dict).
The demo assets come from the session's shared cache (tests/conftest.py: demo_cache), built once per session.
Run: `python -m pytest tests/test_fsdp_sweep.py -q -s`. Its cost is Ray Train's start-up, the embedded MLflow
server and, when no earlier test of the session built them, the demo assets: 276 s alone on 2 shared cores
(load average 4-8), of which 76 s were the demo assets, 150 s the sweep (81 s Ray Train's start) and 30 s export.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.test_reliability_ray import (REPO, TOLERANCE, kill_one_worker_past_a_checkpoint, kill_process_tree,
                                        log_tail, tune_results)

STEPS = 12
SHORTENED = ["resources.num_workers=2", "resources.cpus_per_worker=1", "resources.strategy=fsdp",
             "train.max_steps=12", "train.batch_size=8", "train.checkpoint_every=5", "train.eval_every=6",
             "train.log_every=1", "sweep.max_trials=1", "failure.max_failures=1"]


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
        print(f"worker killed after step {k}; the group restarted from the sharded checkpoint of step {last_checkpoint}")
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
