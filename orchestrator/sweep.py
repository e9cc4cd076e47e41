"""`dpo sweep`: Ray Tune over Ray Train trials, with the incremental beta procedure as a searcher.

Order of work: validate config and data (before Ray starts) -> start or join Ray -> compute the
reference log-probs once as a Ray task (on a GPU node when the sweep uses GPUs) into the sweep's
storage -> a Tuner whose trials each run a TorchTrainer (orchestrator/ray_trial.py) -> the best trial,
the searcher's decision log and the reference-cache key are printed and written to
`<storage_path>/<name>/sweep_summary.json`. `--resume` restores the Tuner of that name: finished
trials are not rerun, unfinished ones continue from their last checkpoint.
Run: `dpo sweep configs/quickstart.yaml [--address auto] [--resume]`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestrator import config as cfg

logger = logging.getLogger(__name__)

SUMMARY_FILE = "sweep_summary.json"
REFERENCE_FAILED = threading.Event()  # set by ReferenceTask.watch; read by reference_stopper() in Tune's loop


@dataclass
class SweepPaths:
    root: str  # <storage>/<name>: the Tuner's experiment folder
    trials: str  # where each trial's TorchTrainer run (and its checkpoints) lives
    reference_cache: str


def sweep_paths(config: cfg.ExperimentConfig) -> SweepPaths:
    storage = config.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    root = f"{storage.rstrip('/')}/{config.name}"
    cache = config.reference.cache_dir or (f"{root}/reference_cache" if "://" not in root else None)
    if cache is None:
        raise cfg.ConfigError("reference.cache_dir: with an object-store storage_path, set it to a shared filesystem path")
    return SweepPaths(root=root, trials=f"{root}-trials", reference_cache=cache)


def start_ray(address: str | None, config: cfg.ExperimentConfig) -> None:
    """Join a cluster (auto / ray://...) or start a local Ray bound to 127.0.0.1, sized to this machine."""
    import ray

    from orchestrator.ray_trial import worker_environment

    runtime_env = {"env_vars": worker_environment(local_cluster=not address)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        bind_local_ray_to_loopback()
        # torch.distributed's store (one per trial) would otherwise listen on every interface
        runtime_env["worker_process_setup_hook"] = "orchestrator.loopback.bind_torch_to_loopback"
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=os.cpu_count(),
                 runtime_env=runtime_env, log_to_driver=True)
    check_cluster_fits(config, ray.cluster_resources())


def bind_local_ray_to_loopback() -> None:
    """Make a local Ray listen on 127.0.0.1 only.

    Ray 2.60 replaces `_node_ip_address="127.0.0.1"` with the machine's routable address (so GCS and
    raylet listen on every interface) unless its single-machine mode is on; that mode is what
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 selects. The constant is read at import, so set it directly too.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def local_resources() -> dict[str, float]:
    """What the local Ray of start_ray offers: every CPU core of this machine and every GPU torch sees."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_cluster_fits(config: cfg.ExperimentConfig, cluster: dict[str, float]) -> None:
    """More workers, CPUs or GPUs than the cluster has is a config error before any trial starts."""
    resources = config.resources
    need_cpu = resources.num_workers * resources.cpus_per_worker
    need_gpu = resources.num_workers * resources.gpus_per_worker if resources.use_gpu else 0
    problems = []
    if need_cpu > cluster.get("CPU", 0):
        problems.append(f"resources.num_workers x resources.cpus_per_worker = {need_cpu:g} CPUs, the cluster has {cluster.get('CPU', 0):g}")
    if need_gpu > cluster.get("GPU", 0):
        problems.append(f"resources.use_gpu: {need_gpu:g} GPUs needed, the cluster has {cluster.get('GPU', 0):g}")
    if problems:
        raise cfg.ConfigError("the trial does not fit the cluster:\n  " + "\n  ".join(problems))


class ReferenceTask:
    """The sweep's one reference pass (log-probs of every train and eval pair), as a Ray task.

    Tune starts the first trial while it runs: each trial worker waits for it (train_worker's
    `reference_ready`) before reading the cache, so Tune's start, the trial driver and Ray Train's worker
    start-up overlap the reference forward. A failure stops the sweep (reference_stopper) and is raised by
    `result`.
    """

    def __init__(self, config: cfg.ExperimentConfig, cache_dir: str, data_ref):
        import ray

        cpus = config.resources.cpus_per_worker

        def compute(experiment: dict[str, Any], loaded) -> tuple[str, bool]:
            import torch

            from trainables.entrypoints import precompute_reference

            exp = cfg.ExperimentConfig.model_validate(experiment)
            if not exp.resources.use_gpu:
                torch.set_num_threads(max(1, int(cpus)))  # Ray pins the task to these CPUs
            _, _, key, reused = precompute_reference(cfg.model_args(exp), cfg.preference_args(exp), loaded,
                                                     cfg.runtime_args(exp, show_progress=False))
            return key, reused

        experiment = config.model_dump()
        experiment["reference"]["cache_dir"] = cache_dir
        options = {"num_cpus": cpus} | ({"num_gpus": 1} if config.resources.use_gpu else {})
        self.cache_dir = cache_dir
        self.ref = ray.remote(compute).options(**options).remote(experiment, data_ref)
        REFERENCE_FAILED.clear()

    def watch(self) -> None:
        """In a background thread: wait for the task; log its cache key, or flag its failure (REFERENCE_FAILED)."""
        import ray

        def wait() -> None:
            try:
                key, reused = ray.get(self.ref)
            except Exception:  # noqa: BLE001 - `result` raises it in the driver
                REFERENCE_FAILED.set()
                return
            logger.info("reference log-probs %s (cache key %s) in %s", "reused" if reused else "computed", key, self.cache_dir)

        threading.Thread(target=wait, name="reference-task", daemon=True).start()

    def result(self) -> str:
        """The cache key (waits; raises the task's error)."""
        import ray

        return ray.get(self.ref)[0]


def reference_stopper():
    """A Tune Stopper that ends the sweep once the reference task has failed (every trial would wait on it).

    Stateless, so it pickles into the Tuner's state and works again after Tuner.restore.
    """
    from ray.tune import Stopper

    class ReferenceFailed(Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            from orchestrator import sweep

            return sweep.REFERENCE_FAILED.is_set()

    return ReferenceFailed()


def searcher_and_space(config: cfg.ExperimentConfig):
    """(search_alg, param_space, num_samples) for the configured strategy."""
    from orchestrator.searchers import IncrementalBetaSearcher, IncrementalBetaSettings, grid_or_random_search_space

    sweep = config.sweep
    beta = sweep.beta if sweep.beta is not None else config.dpo.beta
    kl_weight = sweep.kl_weight if sweep.kl_weight is not None else config.dpo.kl_weight
    learning_rate = sweep.learning_rate if sweep.learning_rate is not None else config.train.learning_rate
    if sweep.strategy == "incremental_beta":
        as_tuple = lambda value: tuple(float(v) for v in (value if isinstance(value, list) else [value]))
        settings = IncrementalBetaSettings(
            task=sweep.task, start_beta=sweep.start_beta, min_beta=sweep.min_beta, max_beta=sweep.max_beta,
            step=sweep.step, backoff=sweep.backoff, kl_weight_factor=sweep.kl_weight_factor, patience=sweep.patience,
            max_rounds=sweep.max_rounds, learning_rates=as_tuple(learning_rate), kl_weights=as_tuple(kl_weight),
        )
        return IncrementalBetaSearcher(settings, metric=sweep.metric, mode=sweep.mode), {}, sweep.max_trials
    if sweep.strategy == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        space = grid_or_random_search_space(beta, kl_weight, learning_rate, "random")
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode), space, sweep.max_trials
    space = grid_or_random_search_space(beta, kl_weight, learning_rate, sweep.strategy)
    return None, space, 1 if sweep.strategy == "grid" else sweep.max_trials


def open_sweep_run(config: cfg.ExperimentConfig, uri: str, resume: bool) -> dict[str, Any]:
    """The sweep's MLflow parent run (found again on --resume); runs a killed driver left RUNNING are closed.

    The reference cache key is tagged when the sweep ends (close_sweep_run), once the reference task is done.
    """
    from orchestrator import tracking

    experiment = config.tracking.experiment or config.name
    if resume:
        closed = tracking.close_stale_runs(uri, experiment, config.name)
        logger.info("closed %d MLflow runs left RUNNING by the interrupted sweep", closed)
    experiment_id, parent_run_id = tracking.start_parent_run(
        uri, experiment, config.name, config.model_dump(),
        search_space={"strategy": config.sweep.strategy, **config.sweep.model_dump()},
        tags=tracking.data_fingerprints({"train": config.data.train, "eval": config.data.eval}),
    )
    return {"uri": uri, "experiment": experiment, "experiment_id": experiment_id,
            "parent_run_id": parent_run_id, "sweep": config.name}


def close_sweep_run(info: dict[str, Any], summary: dict[str, Any] | None, error: str | None) -> None:
    """Decision log and summary as artifacts; trial runs still open are closed; the parent ends."""
    from orchestrator import tracking

    if summary is not None:
        tracking.set_tags(info["uri"], info["parent_run_id"], {"reference_cache_key": summary["reference_cache_key"] or ""})
        tracking.log_text_artifact(info["uri"], info["parent_run_id"], "decision_log.json",
                                   json.dumps(summary["decision_log"], indent=1, default=str))
        tracking.log_text_artifact(info["uri"], info["parent_run_id"], SUMMARY_FILE, json.dumps(summary, indent=1, default=str))
    tracking.close_stale_runs(info["uri"], info["experiment"], info["sweep"], keep=[info["parent_run_id"]])
    tracking.end_run(info["uri"], info["parent_run_id"], "FAILED" if error else "FINISHED", error=error)


def build_tuner(config: cfg.ExperimentConfig, paths: SweepPaths, resume: bool, tracking_info: dict[str, Any] | None = None,
                shared: dict[str, Any] | None = None):
    """shared: object refs every trial worker reads (train_worker): the driver's validated data, the reference task."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.ray_trial import run_trial

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, experiment=config.model_dump(), trials_storage=paths.trials,
                             reference_cache_dir=paths.reference_cache, tracking_info=tracking_info, shared=shared),
        {"cpu": 0, "memory": 1},  # the trial driver only waits (Ray needs a non-empty bundle); its Train workers reserve CPUs/GPUs
    )
    if resume:
        return tune.Tuner.restore(paths.root, trainable=trainable, resume_unfinished=True, resume_errored=False)
    search_alg, space, num_samples = searcher_and_space(config)
    scheduler = None
    if config.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=config.train.max_steps, grace_period=max(1, config.train.eval_every))
    storage_root, name = paths.root.rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=config.sweep.metric, mode=config.sweep.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=num_samples, max_concurrent_trials=config.sweep.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,  # the next trial's driver runs in the finished one's process: no new Python start-up
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_root, failure_config=tune.FailureConfig(max_failures=0),
                                  stop=reference_stopper()),
    )


def summarize(results, config: cfg.ExperimentConfig, cache_key: str | None, root: str) -> dict[str, Any]:
    """Best trial, every trial's final metrics and the searcher's decision log (read from `root`), as plain data."""
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trials.append({
            "trial_id": metrics.get("trial_id"), "config": {k: v for k, v in (result.config or {}).items()},
            "metric": metrics.get(config.sweep.metric), "step": metrics.get("step"),
            "error": str(result.error) if result.error else None, "path": result.path,
            "step_seconds": metrics.get("perf/step_seconds_total"), "eval_seconds": metrics.get("perf/eval_seconds_total"),
            "ray_train_start_seconds": metrics.get("perf/ray_train_start_seconds"),
            "reference_wait_seconds": metrics.get("perf/reference_wait_seconds"), "load_seconds": metrics.get("perf/load_seconds"),
            "trial_seconds": metrics.get("time_total_s"),  # Tune: from the trial's start to its last report
        })
    scored = [t for t in trials if isinstance(t["metric"], (int, float)) and math.isfinite(t["metric"]) and not t["error"]]
    reverse = config.sweep.mode == "max"
    best = sorted(scored, key=lambda t: t["metric"], reverse=reverse)[0] if scored else None
    return {"name": config.name, "metric": config.sweep.metric, "mode": config.sweep.mode, "best": best,
            "trials": trials, "reference_cache_key": cache_key,
            "decision_log": read_decision_log(root), "storage": root}


def read_decision_log(root: str) -> list[dict[str, Any]]:
    """The incremental searcher's decision log from its newest saved state in the sweep folder.

    Newest by name, as Tune's own restore picks it (the name holds the session's start time): after
    `--resume` Tune's storage sync copies the first session's file again, so modification times mislead.
    """
    states = sorted(Path(root).glob("searcher-state-*")) if "://" not in root else []
    for state in reversed(states):
        try:
            return json.loads(state.read_text()).get("decision_log", [])
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return []


def start_tracking(config: cfg.ExperimentConfig) -> Callable[[], str | None]:
    """Resolve the tracking URI; returns a call that gives it (None when tracking is off) once it is usable.

    A server the user named (tracking.uri, MLFLOW_TRACKING_URI) is checked now, so an unreachable one fails
    before any Ray work. The embedded server boots in a background thread (several seconds of imports)
    while Ray starts and the reference log-probs are computed; the returned call waits for it.
    """
    if not config.tracking.enabled:
        return lambda: None
    from orchestrator.mlflow_server import prepare_tracking_uri, resolve_tracking_uri

    if not resolve_tracking_uri(config.tracking.uri, config.storage_path)[1]:
        uri = prepare_tracking_uri(config.tracking.uri, config.storage_path)
        return lambda: uri
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-mlflow")
    booting = pool.submit(prepare_tracking_uri, config.tracking.uri, config.storage_path)
    pool.shutdown(wait=False)  # the thread ends when the server is up (or failed); result() waits for it
    return booting.result


def run_sweep(config: cfg.ExperimentConfig, *, address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The whole `dpo sweep`: validation, Ray, shared reference cache, Tuner, summary."""
    import ray

    from trainables.entrypoints import load_preference_data

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # eval metrics arrive every eval_every steps
    # Bad data and bad config fail first: before a server or Ray starts and before anything is written.
    data = load_preference_data(cfg.model_args(config), cfg.data_args(config))
    logger.info("data ok: %d training pairs, %d held-out pairs", len(data.train), len(data.eval))
    paths = sweep_paths(config)
    if resume and "://" not in paths.root and not Path(paths.root).is_dir():
        raise cfg.ConfigError(f"--resume: no sweep named {config.name!r} under {config.storage_path} ({paths.root})")
    started_here = not ray.is_initialized()
    if started_here and not address:
        check_cluster_fits(config, local_resources())  # a local Ray's size is known before it starts
    tracking_uri_when_ready = start_tracking(config)  # a given server that is unreachable fails here, before Ray
    if started_here:
        start_ray(address, config)
    tracking_info = None
    try:
        data_ref = ray.put(data)  # trials and the reference task read the validated, tokenised data from here
        reference = ReferenceTask(config, paths.reference_cache, data_ref) if config.reference.mode == "precomputed" else None
        tracking_uri = tracking_uri_when_ready()
        if tracking_uri:
            tracking_info = open_sweep_run(config, tracking_uri, resume)
        if reference is not None:
            reference.watch()
        tuner = build_tuner(config, paths, resume, tracking_info,
                            shared={"data": data_ref, "reference_ready": reference.ref if reference else None})
        results = tuner.fit()
        cache_key = reference.result() if reference is not None else None  # raises the task's error, if any
        summary = summarize(results, config, cache_key, paths.root)
        if tracking_info:
            close_sweep_run(tracking_info, summary, error=None)
            summary["mlflow"] = {"uri": tracking_uri, "parent_run_id": tracking_info["parent_run_id"]}
    except BaseException as error:
        if tracking_info:
            close_sweep_run(tracking_info, None, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if started_here:
            ray.shutdown()
    if "://" not in paths.root:
        Path(paths.root, SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"sweep {summary['name']}: {len(summary['trials'])} trials, reference cache key {summary['reference_cache_key']}")
    for entry in summary["decision_log"]:
        print(f"  round {entry.get('round')}: beta {entry.get('beta')} -> {entry.get('action')}: {entry.get('reason')}")
    best = summary["best"]
    if best is None:
        print("no trial produced a finite " + summary["metric"])
        return
    values = {k: best["config"].get(k) for k in ("beta", "kl_weight", "learning_rate") if k in best["config"]}
    print(f"best trial {best['trial_id']}: {summary['metric']}={best['metric']:.4f} {values}")
    print(f"results: {summary['storage']}/{SUMMARY_FILE}")
    if summary.get("mlflow"):
        from orchestrator.tracking import redact

        print(f"MLflow: {redact(summary['mlflow']['uri'])} (parent run {summary['mlflow']['parent_run_id']})")
