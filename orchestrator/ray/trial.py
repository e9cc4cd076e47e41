"""One sweep trial = one Ray Train job (Train V2), driven by a Tune function trainable.

The Tune-over-Train pattern of Ray's Train+Tune example:
1) `run_trial` (the Tune trainable) takes the sweep's RunSpec, puts this trial's searched values in it,
   opens (or finds again) the trial's MLflow run, and fits a TorchTrainer named after the trial id;
2) every Train worker runs `train_worker`: the engine (trainables.entrypoints) with the spec's plain
   arguments, Ray's DDP preparation or our FSDP sharding, and a report that forwards metrics and
   checkpoints to Ray (and, on rank 0, to MLflow).
This module and jobs.py are the only ones that touch ray.train.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config.spec import Resources, RunSpec
from orchestrator.tracking.schema import SEARCHED_PARAMS


@dataclass(frozen=True)
class SharedRefs:
    """Object refs of the sweep driver that every trial worker reads."""

    data: Any = None  # ray.ObjectRef of the validated, tokenised PreferenceData (None: read data_args)
    reference_ready: Any = None  # ray.ObjectRef of the reference task, awaited before training (None: no task)


@dataclass(frozen=True)
class TrialTracking:
    """The sweep's MLflow parent run, under which each trial opens its child run."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker of one job receives (the train_loop_config's only entry)."""

    spec: RunSpec
    shared: SharedRefs = SharedRefs()
    tracking_uri: str | None = None  # with run_id: rank 0 logs the step metrics into this MLflow run
    run_id: str | None = None
    fit_called_at: float | None = None  # for the start-up probe (probes.StartupClock)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the engine's DPO (or SFT) loop with Ray's model preparation and reporting."""
    from orchestrator.ray.probes import StartupClock

    job: WorkerJob = loop_config["job"]
    startup = StartupClock(fit_called_at=job.fit_called_at, worker_entered_at=time.time())  # optional timing probe
    from trainables.entrypoints import run_dpo, run_sft

    spec, resources = job.spec, job.spec.resources
    # 1) what the sweep driver shares: its reference pass (Tune starts trials before it ends) and its data
    if job.shared.reference_ready is not None:
        with startup.waiting_for_reference():
            ray.get(job.shared.reference_ready)
    data = ray.get(job.shared.data) if job.shared.data is not None and spec.stage == "dpo" else None
    # 2) this worker's threads, scratch folder and device
    if not resources.use_gpu:
        torch.set_num_threads(max(1, int(resources.cpus_per_worker)))  # Ray pins the worker to these CPUs
    context = ray.train.get_context()
    local_dir = Path(tempfile.mkdtemp(prefix=f"dpo-{context.get_experiment_name()}-rank{context.get_world_rank()}-"))
    device = ray.train.torch.get_device()
    device = device[0] if isinstance(device, list) else device
    # 3) reports go to Ray (metrics and checkpoints) and, from rank 0, to MLflow (metrics are all-reduced)
    tracker = None
    if job.run_id and context.get_world_rank() == 0:
        from orchestrator.tracking.trial_tracker import TrialTracker

        tracker = TrialTracker(job.tracking_uri, job.run_id)

    def to_ray_and_mlflow(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if tracker is not None:  # asynchronous: never waits for the tracking server
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    report = startup.wrap(to_ray_and_mlflow)

    def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
        if resources.strategy == "fsdp" and context.get_world_size() > 1:  # CPU (gloo) or CUDA (NCCL)
            from trainables.modeling import resolve_autocast_dtype
            from trainables.sharding import shard_model

            compute_dtype = resolve_autocast_dtype(spec.runtime.precision, device)
            return shard_model(model, device=device, compute_dtype=compute_dtype)
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")  # DDP; one worker: just the device

    def run(resume_from: str | None) -> None:
        worker = spec.on_worker(output_dir=str(local_dir), device=str(device), resume_from=resume_from)
        if worker.stage == "sft":
            run_sft(worker.model, worker.data, worker.loop, worker.runtime, report, prepare_model=prepare_model)
        else:
            run_dpo(worker.model, worker.data, worker.preference, worker.loop, worker.runtime, report,
                    prepare_model=prepare_model, data=data)

    try:
        restored = ray.train.get_checkpoint()
        if restored is None:
            run(None)
        else:
            with restored.as_directory() as checkpoint_dir:
                run(checkpoint_dir)
    finally:
        if tracker is not None:
            tracker.close(timeout_s=60)  # flush; run_trial sets the run's status
        shutil.rmtree(local_dir, ignore_errors=True)


def scaling_for(resources: Resources) -> ScalingConfig:
    """The Ray Train scaling of one job: num_workers workers with their CPUs (and GPUs)."""
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker)


def train_job(job: WorkerJob, *, name: str, storage: str, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer of train_worker named `name` under `storage` (no timestamps: a rerun finds its checkpoints)."""
    resources = job.spec.resources
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=scaling_for(resources),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks or [],
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=resources.keep_checkpoints)),
    )


def run_trial(trial_config: dict[str, Any], *, spec: RunSpec, trials_storage: str,
              tracking: TrialTracking | None = None, shared: SharedRefs = SharedRefs()) -> None:
    """The Tune function trainable: one TorchTrainer per trial, named after the trial id.

    With tracking, the trial's MLflow child run (found again by its trial_id tag on resume) ends FINISHED,
    or FAILED with the error as a tag; the workers' rank 0 logs the step metrics into it.
    """
    trial_spec = spec.for_trial(trial_config)
    trial_id = tune.get_context().get_trial_id()
    run_id = None
    if tracking:
        from orchestrator.tracking import records

        searched = {key: trial_config[key] for key in SEARCHED_PARAMS if key in trial_config}
        run_id = records.find_or_create_trial_run(
            tracking.uri, tracking.experiment_id, tracking.parent_run_id, trial_id, tracking.sweep,
            {**searched, **trial_spec.param_dict()},
            tags={"decision": str(trial_config.get("decision", "")), "round": str(trial_config.get("round", ""))},
            stage="dpo", checkpoint_dir=f"{trials_storage}/{trial_id}")
    job = WorkerJob(spec=trial_spec, shared=shared, tracking_uri=tracking.uri if tracking else None, run_id=run_id,
                    fit_called_at=time.time())
    try:
        train_job(job, name=trial_id, storage=trials_storage, callbacks=[TuneReportCallback()]).fit()
    except BaseException as error:
        if run_id:
            records.end_run(tracking.uri, run_id, "FAILED", error=f"{type(error).__name__}: {error}")
        raise
    if run_id:
        records.end_run(tracking.uri, run_id, "FINISHED")
