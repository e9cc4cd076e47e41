"""The study's training jobs on Ray: SFT and fixed-hyperparameter DPO as Ray Train jobs, DPO sweeps.

Each training stage of `dpo study` is one TorchTrainer named after the stage (no timestamps: a rerun
finds the job's checkpoints again and continues from the last one). Both run
orchestrator.ray_trial.train_worker, the worker function a sweep trial runs (the SFT stage with
`"stage": "sft"`, which calls the engine's run_sft). An arm in `mode: sweep` runs `dpo sweep`
(orchestrator.sweep.run_sweep) on the arm's derived config, inside the study's Ray, and keeps the best
trial's final model. Whatever ran, the stage's result is copied to a stable `model/` folder.
This module and ray_trial.py are the only ones that touch ray.train. Exercised by
`python -m pytest tests/test_study.py -m ray -q`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from orchestrator import config as cfg
from orchestrator.ray_trial import scaling_for, train_worker

logger = logging.getLogger(__name__)


def fit_training_job(stage: str, experiment: cfg.ExperimentConfig, *, name: str, storage: str,
                     tracking: dict[str, str] | None = None) -> str:
    """Train one stage (`sft` or `dpo`) as a TorchTrainer named `name` under `storage`; returns the final
    checkpoint's model directory. tracking: {"uri", "run_id"} of the MLflow run that gets the step metrics."""
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"experiment": experiment.model_dump(), "tracking": tracking, "stage": stage},
        scaling_config=scaling_for(experiment.resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=experiment.failure.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=experiment.train.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the {stage} job {name} finished without a checkpoint; see its log under {storage}/{name}")
    return checkpoint_model_dir(Path(result.checkpoint.path))


def checkpoint_model_dir(checkpoint: Path) -> str:
    """The HF model folder inside a reported engine checkpoint (checkpoint/model)."""
    model_dir = checkpoint / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} holds no model/config.json; it is not an engine checkpoint")
    return str(model_dir)


def final_trial_model_dir(trials_storage: str, trial_id: str) -> str:
    """The model of a sweep trial's last checkpoint (highest step in its manifest)."""
    candidates = []
    for manifest in Path(trials_storage, trial_id).glob("checkpoint_*/manifest.json"):
        try:
            candidates.append((int(json.loads(manifest.read_text())["step"]), manifest.parent))
        except (OSError, ValueError, KeyError):
            continue
    if not candidates:
        raise FileNotFoundError(f"sweep trial {trial_id} left no complete checkpoint under {trials_storage}/{trial_id}")
    return checkpoint_model_dir(max(candidates)[1])


def run_arm_sweep(experiment: cfg.ExperimentConfig) -> tuple[str, dict[str, Any]]:
    """`dpo sweep` of one arm inside the study's Ray; (best trial's final model directory, sweep summary).

    A sweep that already finished is read back from its summary; one that was interrupted resumes.
    """
    from orchestrator.sweep import SUMMARY_FILE, run_sweep, sweep_paths

    paths = sweep_paths(experiment)
    summary_file = Path(paths.root, SUMMARY_FILE)
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        summary = run_sweep(experiment, resume=Path(paths.root).is_dir())
    best = summary.get("best")
    if not best:
        raise RuntimeError(f"the sweep {experiment.name} produced no trial with a finite {summary.get('metric')}; "
                           f"see {paths.root}")
    return final_trial_model_dir(paths.trials, best["trial_id"]), summary


def copy_model(source: str, destination: Path) -> str:
    """Copy a model folder into place atomically (staging folder, then rename); returns the destination."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        shutil.copytree(source, staging / "model")
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging / "model", destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(destination)
