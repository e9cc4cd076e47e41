"""One sweep trial = one Ray Train TorchTrainer (Train V2), driven by a Tune function trainable.

The Tune-over-Train pattern of Ray's train_tune_interop example: `run_trial` is the Tune trainable; it
builds a TorchTrainer named after the Tune trial id (no timestamps, so `dpo sweep --resume` finds the
same run and its checkpoints) with TuneReportCallback, and each of its workers runs `train_worker`,
which calls the engine (trainables.entrypoints.run_dpo) with plain arguments, Ray's prepare_model (DDP)
or trainables.sharding (FSDP) and a report that forwards metrics and checkpoints to Ray. This is the only
module that touches ray.train. Exercised by `python -m pytest tests/test_sweep.py -m ray -q`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import config as cfg

SEARCHED_KEYS = {"beta": ("dpo", "beta"), "kl_weight": ("dpo", "kl_weight"), "learning_rate": ("train", "learning_rate")}


def trial_experiment(experiment: dict[str, Any], trial_config: dict[str, Any], reference_cache_dir: str) -> cfg.ExperimentConfig:
    """The base experiment with this trial's beta / kl_weight / learning_rate, validated again."""
    raw = {section: dict(value) if isinstance(value, dict) else value for section, value in experiment.items()}
    for key, (section, field) in SEARCHED_KEYS.items():
        if key in trial_config:
            raw[section][field] = float(trial_config[key])
    raw["reference"]["cache_dir"] = reference_cache_dir
    return cfg.ExperimentConfig.model_validate(raw)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the engine's DPO loop (or, with `"stage": "sft"`, its SFT loop)
    with Ray's model preparation and reporting."""
    entered = time.time()
    from trainables.entrypoints import run_dpo, run_sft

    stage = loop_config.get("stage", "dpo")
    experiment = cfg.ExperimentConfig.model_validate(loop_config["experiment"])
    shared = loop_config.get("shared") or {}  # object refs from the sweep driver (orchestrator/sweep.py)
    startup = StartupClock(fit_called_at=loop_config.get("fit_called_at"), worker_entered_at=entered)
    if shared.get("reference_ready") is not None:
        with startup.waiting_for_reference():  # the sweep's reference task: Tune starts trials before it ends
            ray.get(shared["reference_ready"])
    data = ray.get(shared["data"]) if shared.get("data") is not None and stage == "dpo" else None
    resources = experiment.resources
    if not resources.use_gpu:
        torch.set_num_threads(max(1, int(resources.cpus_per_worker)))  # Ray pins the worker to these CPUs
    context = ray.train.get_context()
    local_dir = Path(tempfile.mkdtemp(prefix=f"dpo-{context.get_experiment_name()}-rank{context.get_world_rank()}-"))
    device = ray.train.torch.get_device()
    device = device[0] if isinstance(device, list) else device

    tracker = None
    if loop_config.get("tracking") and context.get_world_rank() == 0:  # metrics are already all-reduced
        from orchestrator.trial_tracker import TrialTracker

        tracker = TrialTracker(loop_config["tracking"]["uri"], loop_config["tracking"]["run_id"])

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        metrics = {**metrics, **startup.metrics(metrics)}
        if tracker is not None:  # asynchronous: never waits for the tracking server
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
        if resources.strategy == "fsdp" and context.get_world_size() > 1:  # CPU (gloo) or CUDA (NCCL)
            from trainables.modeling import resolve_autocast_dtype
            from trainables.sharding import shard_model

            compute_dtype = resolve_autocast_dtype(experiment.train.precision, device)
            return shard_model(model, device=device, compute_dtype=compute_dtype)
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")  # DDP; one worker: just the device

    def run(resume_from: str | None) -> None:
        runtime = cfg.runtime_args(experiment, show_progress=False)
        runtime = type(runtime)(**{**runtime.__dict__, "device": str(device), "resume_from": resume_from})
        loop = cfg.loop_settings(experiment, output_dir=str(local_dir), workers=context.get_world_size(), show_progress=False)
        if stage == "sft":
            run_sft(cfg.model_args(experiment), cfg.data_args(experiment, sft=True), loop, runtime, report,
                    prepare_model=prepare_model)
        else:
            run_dpo(cfg.model_args(experiment), cfg.data_args(experiment), cfg.preference_args(experiment), loop,
                    runtime, report, prepare_model=prepare_model, data=data)

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


class StartupClock:
    """Where a trial's time goes before its first optimizer step, as `perf/*` metrics of every report.

    - perf/ray_train_start_seconds: from the trial driver's TorchTrainer.fit() to train_worker starting
      (Ray Train's controller, worker and helper processes; the trial driver's clock, so one machine or
      synchronised clocks);
    - perf/reference_wait_seconds: waiting for the sweep's reference task (the first trials only);
    - perf/load_seconds: the rest of the time from train_worker starting to the first report, less the
      first step: imports, data, reference cache, model loading and wrapping (DDP/FSDP).
    Fixed at the first report; bench/sweep.py sums them into the sweep's overhead breakdown.
    """

    def __init__(self, fit_called_at: float | None, worker_entered_at: float):
        self.fit_called_at = fit_called_at
        self.entered = worker_entered_at
        self.reference_wait = 0.0
        self.figures: dict[str, float] | None = None

    @contextlib.contextmanager
    def waiting_for_reference(self):
        started = time.time()
        try:
            yield
        finally:
            self.reference_wait += time.time() - started

    def metrics(self, first_report: dict[str, Any]) -> dict[str, float]:
        if self.figures is None:
            in_steps = float(first_report.get("perf/step_seconds_total", 0.0)) + float(first_report.get("perf/eval_seconds_total", 0.0))
            self.figures = {"perf/reference_wait_seconds": self.reference_wait,
                            "perf/load_seconds": max(0.0, time.time() - self.entered - self.reference_wait - in_steps)}
            if self.fit_called_at is not None:
                self.figures["perf/ray_train_start_seconds"] = max(0.0, self.entered - self.fit_called_at)
        return self.figures


def scaling_for(resources: cfg.ResourcesSection) -> ScalingConfig:
    """The Ray Train scaling of one job: resources.num_workers workers with their CPUs (and GPUs)."""
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker)


def run_trial(trial_config: dict[str, Any], *, experiment: dict[str, Any], trials_storage: str, reference_cache_dir: str,
              tracking_info: dict[str, Any] | None = None, shared: dict[str, Any] | None = None) -> None:
    """The Tune function trainable: one TorchTrainer per trial, named after the trial id.

    shared: object refs of the sweep driver that every worker reads: "data" (the validated, tokenised
    PreferenceData, instead of reading and tokenising the files again) and "reference_ready" (the reference
    task, awaited before training).

    With tracking, the trial's MLflow child run (found again by its trial_id tag on resume) ends FINISHED,
    or FAILED with the error as a tag; the workers' rank 0 logs the step metrics into it.
    """
    trial = trial_experiment(experiment, trial_config, reference_cache_dir)
    trial_id = tune.get_context().get_trial_id()
    run_id = None
    if tracking_info:
        from orchestrator import tracking

        run_id = tracking.find_or_create_trial_run(
            tracking_info["uri"], tracking_info["experiment_id"], tracking_info["parent_run_id"], trial_id,
            tracking_info["sweep"], {**{k: trial_config[k] for k in SEARCHED_KEYS if k in trial_config}, **trial.model_dump()},
            tags={"decision": str(trial_config.get("decision", "")), "round": str(trial_config.get("round", ""))},
            stage="dpo", checkpoint_dir=f"{trials_storage}/{trial_id}")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"experiment": trial.model_dump(), "shared": shared, "fit_called_at": time.time(),
                           "tracking": {"uri": tracking_info["uri"], "run_id": run_id} if run_id else None},
        scaling_config=scaling_for(trial.resources),
        run_config=RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=trials_storage,
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=trial.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=trial.train.keep_checkpoints),
        ),
    )
    try:
        trainer.fit()
    except BaseException as error:
        if run_id:
            tracking.end_run(tracking_info["uri"], run_id, "FAILED", error=f"{type(error).__name__}: {error}")
        raise
    if run_id:
        tracking.end_run(tracking_info["uri"], run_id, "FINISHED")


def worker_environment(local_cluster: bool = False) -> dict[str, str]:
    """Environment every Ray worker gets (runtime_env): quiet tokenizers, no hub calls when offline.

    local_cluster: the single-machine Ray that `dpo sweep` starts itself, where no node is ever drained,
    so Ray Train's preemption watcher (one more actor process per trial) has nothing to watch.
    """
    # Train V2 workers hand each report to the controller, which collects it at every health check
    # (default every 2 s): a report blocks until then. Checking often keeps reports from stalling steps.
    env = {"TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")}
    if local_cluster:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DPO_DEMO_CACHE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env
