"""One sweep trial, run one of two ways, and the Ray Train worker of multi-worker trials and study stages.

- Warm (one worker per trial, the default then): `warm_trial` is the Tune function trainable and runs
  the engine itself, in Tune's trial actor. The Tuner reuses that actor for the next trial (reuse_actors),
  so torch, transformers, the engine and the sweep's tokenised pairs are loaded once per actor instead of
  once per trial, and no Ray Train process starts. Metrics and checkpoints go to `ray.tune.report`; a
  retried or resumed trial continues from `ray.tune.get_checkpoint()`; Tune's FailureConfig retries it.
- Ray Train (several workers, or resources.trial_mode: train): `run_trial` fits a TorchTrainer named
  after the trial id; every worker runs `train_worker` (DDP or FSDP); Ray Train retries the workers.
Both run the same pieces: the trial's MLflow run (`trial_run`: found again on a retry or --resume, ended
FINISHED, FAILED or KILLED), the engine with its report to Ray and, from rank 0, to MLflow (`run_engine`),
and the optional start-up probe (probes.StartupClock). docs/sweeps.md#warm-trials says why the warm path
calls the engine directly instead of Ray Train's local mode. This module and jobs.py are the only ones
that touch ray.train.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config.layout import StorageLayout
from orchestrator.config.spec import Resources, RunSpec
from orchestrator.ray.probes import StartupClock
from orchestrator.tracking.schema import SEARCHED_PARAMS
from trainables.preemption import Preempted, install_in_worker, trial_scope

# In a Ray worker this import runs in the main thread (a trainable is unpickled there), the only thread that
# may install signal handlers: SIGTERM / SIGINT then checkpoint a trial's step in progress (trainables/preemption.py).
if ray._private.worker.global_worker.mode == ray.WORKER_MODE:
    install_in_worker()

Send = Callable[[dict[str, Any], "Checkpoint | None"], None]  # ray.train.report or ray.tune.report


@dataclass(frozen=True)
class SharedRefs:
    """Object refs of the sweep driver that every trial worker reads."""

    data: Any = None  # ray.ObjectRef of the validated, tokenised PreferenceData (None: read data_args)
    reference_ready: Any = None  # ray.ObjectRef of the reference task, awaited before training (None: no task)
    reference_wait_s: float = 21600.0  # how long a trial waits for it (reference.wait_timeout_s)
    reference_key: str | None = None  # the cache key when the driver computes the pass itself (DriverReference)


@dataclass(frozen=True)
class TrialTracking:
    """The sweep's MLflow parent run, under which each trial opens its child run.

    A fresh sweep starts Tune while the driver still opens the parent run: uri, experiment_id and
    parent_run_id are then None and `handoff` (a handoff.Handoff actor) gives them; `resolved` waits for them.
    """

    uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    sweep: str
    journal_dir: str | None = None  # metric journals of the trials' runs (metric_journal.py); None: none
    system_metrics: bool = False  # each trial's rank 0 logs MLflow system metrics into its run
    handoff: Any = None  # the Handoff actor that will hold (uri, experiment_id, parent_run_id); None: known

    def resolved(self, timeout_s: float = 900.0) -> "TrialTracking":
        """This tracking with the parent run known (waits for the driver to open it; raises its error)."""
        if self.handoff is None:
            return self
        from dataclasses import replace

        opened = ray.get(self.handoff.get.remote(), timeout=timeout_s)
        return replace(self, handoff=None, uri=opened["uri"], experiment_id=opened["experiment_id"],
                       parent_run_id=opened["parent_run_id"])


@dataclass(frozen=True)
class WorkerJob:
    """What every process that runs the engine for one job receives (a Train worker's train_loop_config entry)."""

    spec: RunSpec
    shared: SharedRefs = SharedRefs()
    tracking_uri: str | None = None  # with run_id: rank 0 logs the step metrics into this MLflow run
    run_id: str | None = None
    journal_dir: str | None = None  # with run_id: rank 0 journals its metric points there (no point lost)
    system_metrics: bool = False  # with run_id: rank 0 logs MLflow system metrics (CPU, memory, GPU) into it
    fit_called_at: float | None = None  # for the start-up probe (probes.StartupClock); None: no Ray Train
    trial_started_at: float | None = None  # when the trial function started (probes.StartupClock)


# ---- the pieces both ways share ------------------------------------------------------------------

_SHARED_DATA: dict[str, Any] = {}  # this process's copy of the sweep's pairs: a warm actor reads them once


def read_shared(job: WorkerJob, startup: StartupClock) -> Any:
    """Wait for the sweep's reference task (Tune starts trials before it ends); the shared pairs (or None)."""
    if job.shared.reference_ready is not None:
        from orchestrator.ray.reference_task import wait_for_reference

        with startup.waiting_for_reference():
            wait_for_reference(job.shared.reference_ready, job.shared.reference_wait_s, "this trial")
    if job.shared.data is None or job.spec.stage != "dpo":
        return None
    key = job.shared.data.hex()
    if key not in _SHARED_DATA:  # read-only in the engine, so one copy serves every trial of this sweep
        _SHARED_DATA.clear()
        _SHARED_DATA[key] = ray.get(job.shared.data)
    return _SHARED_DATA[key]


def run_engine(job: WorkerJob, *, rank: int, device: str, send: Send, restored: Checkpoint | None,
               startup: StartupClock, prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
    """The engine's DPO (or SFT) run of job.spec in this process; reports go to `send` (Ray) and, on rank 0
    with a run id, to MLflow; `restored`: the checkpoint to continue from (None: from the start)."""
    from trainables.entrypoints import run_dpo, run_sft

    spec, resources = job.spec, job.spec.resources
    data = read_shared(job, startup)
    # the cache key the reference task computed once for the sweep (already resolved): no rank re-hashes the weights
    reference_key = (ray.get(job.shared.reference_ready)[0] if job.shared.reference_ready is not None
                     else job.shared.reference_key)
    if not resources.use_gpu:
        torch.set_num_threads(max(1, int(resources.cpus_per_worker)))  # the CPUs Ray reserved for this process
    local_dir = Path(tempfile.mkdtemp(prefix=f"dpo-{spec.name}-rank{rank}-"))
    tracker = None
    if job.run_id and rank == 0:
        from orchestrator.tracking.metric_journal import journal_path
        from orchestrator.tracking.trial_tracker import TrialTracker

        tracker = TrialTracker(job.tracking_uri, job.run_id,
                               journal=journal_path(job.journal_dir, job.run_id) if job.journal_dir else None)
    system_metrics = None
    if job.run_id and rank == 0 and job.system_metrics:  # rank 0's node only (docs/mlflow.md#system-metrics)
        from orchestrator.tracking.trial_tracker import start_system_metrics

        system_metrics = start_system_metrics(job.tracking_uri, job.run_id)

    def to_ray_and_mlflow(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if tracker is not None:  # asynchronous: never waits for the tracking server
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
        send(metrics, Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    report = startup.wrap(to_ray_and_mlflow)  # optional timing probe: perf/* figures on every report

    def run(resume_from: str | None) -> None:
        worker = spec.on_worker(output_dir=str(local_dir), device=device, resume_from=resume_from)
        if worker.stage == "sft":
            run_sft(worker.model, worker.data, worker.loop, worker.runtime, report, prepare_model=prepare_model)
        else:
            run_dpo(worker.model, worker.data, worker.preference, worker.loop, worker.runtime, report,
                    prepare_model=prepare_model, data=data, reference_key=reference_key)

    try:
        if restored is None:
            run(None)
        else:
            with restored.as_directory() as checkpoint_dir:
                run(checkpoint_dir)
    finally:
        if system_metrics is not None:
            system_metrics.finish()
        if tracker is not None:
            tracker.close(timeout_s=60)  # flush; trial_run sets the run's status
        shutil.rmtree(local_dir, ignore_errors=True)


@contextlib.contextmanager
def trial_run(tracking: TrialTracking | None, trial_config: dict[str, Any], spec: RunSpec,
              checkpoint_dir: str) -> Iterator[str | None]:
    """The trial's MLflow child run (None without tracking), found again by its trial_id tag on a retry or
    --resume; ends FINISHED, FAILED with the error as a tag, or KILLED when Tune stopped the trial before
    its last step (ASHA, a stopper: Tune ends a stopped trial's thread with SystemExit inside a report; ASHA
    also stops every trial at its last report, which is FINISHED: its final checkpoint is there)."""
    if tracking is None:
        yield None
        return
    from orchestrator.tracking import records

    trial_id = tune.get_context().get_trial_id()
    searched = {key: trial_config[key] for key in SEARCHED_PARAMS if key in trial_config}
    run_id = records.find_or_create_trial_run(
        tracking.uri, tracking.experiment_id, tracking.parent_run_id, trial_id, tracking.sweep,
        {**searched, **spec.param_dict()},
        tags={"decision": str(trial_config.get("decision", "")), "round": str(trial_config.get("round", ""))},
        stage="dpo", checkpoint_dir=checkpoint_dir)
    try:
        yield run_id
    except SystemExit:
        records.end_run(tracking.uri, run_id, "FINISHED" if reached_last_step(spec, checkpoint_dir) else "KILLED")
        raise
    except BaseException as error:
        records.end_run(tracking.uri, run_id, "FAILED", error=f"{type(error).__name__}: {error}")
        raise
    records.end_run(tracking.uri, run_id, "FINISHED")


def reached_last_step(spec: RunSpec, checkpoint_dir: str) -> bool:
    """Whether the trial's folder holds the checkpoint of its last step (the engine always checkpoints it)."""
    from orchestrator.config.layout import find_checkpoints, is_remote

    if is_remote(checkpoint_dir):
        return False  # unknown in object storage: the run ends KILLED, as a stopped trial's
    return any(step >= spec.loop.max_steps for step, _ in find_checkpoints(Path(checkpoint_dir)))


def preemption_grace_s(spec: RunSpec) -> float:
    """train.preemption_grace_s of the run (its resolved config's params; 60 s, the schema default, if absent)."""
    return float(spec.param_dict().get("train.preemption_grace_s", 60.0))


# ---- warm: the engine in Tune's (reused) trial actor ---------------------------------------------

def warm_device(resources: Resources) -> str:
    """The trial actor's device: Ray sets CUDA_VISIBLE_DEVICES to the GPU (or GPU share) Tune assigned it."""
    return "cuda:0" if resources.use_gpu else "cpu"


def warm_resources(resources: Resources) -> dict[str, float]:
    """What a warm trial reserves, so that Tune runs as many at once as fit: its CPUs and GPU (share)."""
    return {"cpu": resources.cpus_per_worker} | ({"gpu": resources.gpus_per_worker} if resources.use_gpu else {})


def warm_trial(trial_config: dict[str, Any], *, spec: RunSpec, layout: StorageLayout,
               tracking: TrialTracking | None = None, shared: SharedRefs = SharedRefs()) -> None:
    """The Tune function trainable of a warm sweep: this trial's engine run, in this (reused) actor."""
    started = time.time()
    trial_spec = spec.for_trial(trial_config)
    trial_id = tune.get_context().get_trial_id()
    tracking = tracking.resolved() if tracking else None  # the parent run may still be opening (handoff.py)
    try:
        with trial_run(tracking, trial_config, trial_spec, layout.trial_dir(trial_id)) as run_id:
            job = WorkerJob(spec=trial_spec, shared=shared, tracking_uri=tracking.uri if tracking else None,
                            run_id=run_id, journal_dir=tracking.journal_dir if tracking else None,
                            system_metrics=bool(tracking and tracking.system_metrics),
                            trial_started_at=started)
            with trial_scope(preemption_grace_s(trial_spec)):  # SIGTERM: checkpoint, report, Preempted; Tune retries
                run_engine(job, rank=0, device=warm_device(spec.resources),
                           send=lambda metrics, checkpoint: tune.report(metrics, checkpoint=checkpoint),
                           restored=tune.get_checkpoint(), startup=StartupClock.of(job, entered_at=started))
    finally:
        gc.collect()  # the next trial in this actor starts without this one's model and optimizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- Ray Train: a TorchTrainer per trial ---------------------------------------------------------

def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the engine with Ray's model preparation (DDP) or our FSDP sharding."""
    job: WorkerJob = loop_config["job"]
    startup = StartupClock.of(job, entered_at=time.time())
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    device = device[0] if isinstance(device, list) else device

    def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")  # DDP; one worker: just the device

    if job.spec.resources.strategy == "fsdp" and context.get_world_size() > 1:  # CPU (gloo) or CUDA (NCCL)
        from trainables.modeling import resolve_autocast_dtype
        from trainables.sharding import FSDPPreparer

        # shards the model as it loads: rank 0 reads the weights, every rank receives only its shards
        prepare_model = FSDPPreparer(device, resolve_autocast_dtype(job.spec.runtime.precision, device))

    # SIGTERM / SIGINT to any worker: every rank checkpoints the step in progress (the loop agrees on it),
    # reports it and ends with Preempted; Ray Train restarts the group from that checkpoint.
    with trial_scope(preemption_grace_s(job.spec)):
        try:
            run_engine(job, rank=context.get_world_rank(), device=str(device),
                       send=lambda metrics, checkpoint: ray.train.report(metrics, checkpoint=checkpoint),
                       restored=ray.train.get_checkpoint(), startup=startup, prepare_model=prepare_model)
        except Preempted:
            wait_for_reports_taken()  # else Ray Train can restart the group without the stop step's checkpoint
            raise


def wait_for_reports_taken(timeout_s: float = 60.0) -> None:
    """Wait until Ray Train's controller has taken every report this worker queued.

    The controller takes one queued report per worker per poll, and a poll that finds the training function
    ended with an error restarts the group with what it has: reports still queued then are dropped. A stop
    checkpoint reported right after a regular one was lost that way (tests/test_fsdp_sweep.py). Ray Train's
    queue is internal (ray.train.v2), so this reads it defensively and gives up after timeout_s.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        reports = get_train_context().execution_context.result_queue
    except (ImportError, AttributeError, RuntimeError):
        return
    deadline = time.monotonic() + timeout_s
    while getattr(reports, "unfinished_tasks", 0) and time.monotonic() < deadline:
        time.sleep(0.05)


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


def run_trial(trial_config: dict[str, Any], *, spec: RunSpec, layout: StorageLayout,
              tracking: TrialTracking | None = None, shared: SharedRefs = SharedRefs()) -> None:
    """The Tune function trainable of a Ray Train sweep: one TorchTrainer per trial, named after the trial id,
    stored under layout.trials; the workers' rank 0 logs the step metrics into the trial's MLflow run."""
    started = time.time()
    trial_spec = spec.for_trial(trial_config)
    trial_id = tune.get_context().get_trial_id()
    tracking = tracking.resolved() if tracking else None  # the parent run may still be opening (handoff.py)
    with trial_run(tracking, trial_config, trial_spec, layout.trial_dir(trial_id)) as run_id:
        job = WorkerJob(spec=trial_spec, shared=shared, tracking_uri=tracking.uri if tracking else None, run_id=run_id,
                        journal_dir=tracking.journal_dir if tracking else None,
                        system_metrics=bool(tracking and tracking.system_metrics),
                        fit_called_at=time.time(), trial_started_at=started)
        train_job(job, name=trial_id, storage=layout.trials, callbacks=[TuneReportCallback()]).fit()


def trial_trainable(mode: str) -> Callable[..., None]:
    """The Tune function trainable of a sweep whose trials run `mode` (warm | train)."""
    return warm_trial if mode == "warm" else run_trial
