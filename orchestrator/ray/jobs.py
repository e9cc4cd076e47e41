"""A study's training stages on Ray: one Ray Train job per fixed-value stage, or an arm's own sweep.

The SFT stage and a DPO arm in `mode: fixed` are each one TorchTrainer of trial.py's worker, named after
the stage and stored under the study's `train-jobs/` (no timestamps: a rerun of the study finds the
same run and continues from its last checkpoint). A DPO arm in `mode: sweep` is a whole `dpo sweep`
(orchestrator/workflows/sweep.py) inside the study's Ray (warm trials for one worker); its best trial's
last checkpoint is the arm's model. Either way the caller gets a model folder (a checkpoint's model/).
This module and trial.py are the only ones that touch ray.train. Exercised by `python -m pytest tests/test_study.py -m ray -q`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.config.layout import StorageLayout, find_checkpoints
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.spec import RunSpec, resolve_experiment
from orchestrator.errors import NotFoundError
from orchestrator.ray.trial import WorkerJob, train_job

logger = logging.getLogger(__name__)


def fit_training_job(spec: RunSpec, *, name: str, storage: str, tracking_uri: str | None = None,
                     run_id: str | None = None) -> str:
    """Train one stage (spec.stage: sft or dpo) as a Ray Train job named `name` under `storage`; returns
    the final checkpoint's model folder. tracking_uri + run_id: the MLflow run that gets the step metrics."""
    job = WorkerJob(spec=spec, tracking_uri=tracking_uri, run_id=run_id)
    result = train_job(job, name=name, storage=storage).fit()
    if result.checkpoint is None:  # the engine always checkpoints its last step: not the user's doing
        raise RuntimeError(f"the {spec.stage} job {name} finished without a checkpoint; see its log under {storage}/{name}")
    return checkpoint_model_dir(Path(result.checkpoint.path))


def checkpoint_model_dir(checkpoint: Path) -> str:
    """The Hugging Face model folder inside an engine checkpoint (checkpoint/model); for a sharded (FSDP)
    checkpoint, its weights consolidated once into checkpoint/consolidated (as `dpo export` writes them)."""
    from trainables.checkpointing import is_sharded_checkpoint

    if is_sharded_checkpoint(checkpoint):
        return consolidated_model_dir(checkpoint)
    model_dir = checkpoint / "model"
    if not (model_dir / "config.json").is_file():
        raise NotFoundError(f"checkpoint {checkpoint} holds no model/config.json; it is not a complete engine "
                            "checkpoint (was the folder changed or partly deleted?)")
    return str(model_dir)


def consolidated_model_dir(checkpoint: Path) -> str:
    """checkpoint/consolidated: the sharded checkpoint's model in one Hugging Face folder (LoRA merged), written
    once through a staging folder and renamed into place, so a folder that exists is complete."""
    import os
    import shutil

    from orchestrator.workflows.export import write_weights

    final = checkpoint / "consolidated"
    if not (final / "config.json").is_file():
        staging = checkpoint / f".consolidated-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        write_weights(checkpoint, staging, base_model=None, include_adapter=False)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        logger.info("consolidated the sharded checkpoint %s into %s", checkpoint, final)
    return str(final)


def final_trial_model_dir(layout: StorageLayout, trial_id: str) -> str:
    """The model of a sweep trial's last complete checkpoint (the highest step), in the trial's folder for
    the layout's trial mode (a warm trial's Tune folder or a Ray Train trial's run)."""
    checkpoints = find_checkpoints(Path(layout.trial_dir(trial_id)))
    if not checkpoints:
        raise NotFoundError(f"sweep {layout.name}: trial {trial_id} left no complete checkpoint under "
                            f"{layout.trial_dir(trial_id)}")
    return checkpoint_model_dir(checkpoints[-1][1])


def run_arm_sweep(arm_config: ExperimentConfig) -> tuple[str, dict[str, Any]]:
    """`dpo sweep` of one arm inside the study's Ray; (best trial's final model folder, sweep summary).

    A sweep that already finished is read back from its summary; one that was interrupted resumes.
    """
    from orchestrator.workflows.sweep import read_summary, run_sweep

    experiment = resolve_experiment(arm_config)
    layout = experiment.layout
    summary = read_summary(layout)
    if summary is None:
        summary = run_sweep(experiment, resume=layout.exists())
    best = summary.get("best")
    if not best:
        raise NotFoundError(f"the sweep {experiment.name} produced no trial with a finite {summary.get('metric')} "
                            f"(every trial failed or diverged); see {layout.root}")
    # the mode the trials ran with (a resumed sweep keeps its own); None, from an older summary: found on disk
    ran_as = replace(layout, trial_mode=summary.get("trial_mode"))
    return final_trial_model_dir(ran_as, best["trial_id"]), summary
