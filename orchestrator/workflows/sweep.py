"""`dpo sweep`: Ray Tune over the engine's trials, with the incremental beta procedure as a searcher.

1) validate the config (done by the CLI) and every data row, before any server or Ray starts;
2) start or join Ray; start (or reach) the MLflow server and open the sweep's parent run in a thread, while
   Tune starts (trials that start first wait for it: orchestrator/ray/handoff.py; on --resume it is opened,
   and the killed driver's metric points replayed, before Tune starts);
3) compute the reference log-probs once, in the driver (local CPU Ray) or as Ray tasks, into the sweep's
   cache, while Tune starts;
4) fit the Tuner (orchestrator/ray/tuner.py): each trial runs the engine in a reused Tune trial actor
   (one worker) or as a Ray Train job (several workers);
5) summarise: the best trial, the searcher's decision log and the reference-cache key are printed,
   logged on the parent run and written to the layout's sweep_summary.json.
`--resume` restores the Tuner of that name: finished trials are not rerun, unfinished ones continue
from their last checkpoint. Run: `dpo sweep configs/quickstart.yaml [--address auto] [--resume]`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

from orchestrator.config.layout import StorageLayout
from orchestrator.config.spec import Experiment, TrackingSpec
from orchestrator.errors import ConfigError
from orchestrator.tracking import schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRecords:
    """The sweep's MLflow parent run, once opened."""

    uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    sweep: str


def open_sweep_run(experiment: Experiment, uri: str, resume: bool) -> SweepRecords:
    """The sweep's MLflow parent run (found again on --resume); runs a killed driver left RUNNING are closed.

    The reference cache key is tagged when the sweep ends (close_sweep_run), once the reference task is done.
    """
    from orchestrator.tracking import records

    name, mlflow_experiment, config = experiment.name, experiment.tracking.experiment, experiment.resolved_config()
    if resume:
        closed = records.close_stale_runs(uri, mlflow_experiment, name)
        logger.info("closed %d MLflow runs left RUNNING by the interrupted sweep", closed)
    experiment_id, parent_run_id = records.start_parent_run(
        uri, mlflow_experiment, name, config,
        search_space={"strategy": config["sweep"]["strategy"], **config["sweep"]},
        tags=records.data_fingerprints({"train": experiment.run.data.train, "eval": experiment.run.data.eval}),
    )
    records.log_dataset_inputs(uri, parent_run_id, {"train": experiment.run.data.train, "eval": experiment.run.data.eval})
    return SweepRecords(uri, mlflow_experiment, experiment_id, parent_run_id, name)


def open_sweep_run_meanwhile(experiment: Experiment, uri_when_ready: Callable[[], str | None]):
    """A fresh sweep's parent run, opened in a thread while Tune starts; (future of its SweepRecords, the
    Handoff actor that gives it to the trials that start first: orchestrator/ray/handoff.py)."""
    from orchestrator.ray.handoff import SETUP_FAILED, Handoff

    handoff = Handoff.remote()

    def open_and_hand_over() -> SweepRecords:
        try:
            records = open_sweep_run(experiment, uri_when_ready(), resume=False)
        except BaseException as error:
            SETUP_FAILED.set()  # the Tuner's stopper ends the sweep; the driver raises `error`
            handoff.fail.remote(f"the sweep's MLflow parent run could not be opened: {type(error).__name__}: {error}")
            raise
        handoff.put.remote({"uri": records.uri, "experiment_id": records.experiment_id,
                            "parent_run_id": records.parent_run_id})
        return records

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep-parent-run")
    opening = pool.submit(open_and_hand_over)
    pool.shutdown(wait=False)
    return opening, handoff


def close_sweep_run(sweep: SweepRecords, summary: dict[str, Any] | None, error: str | None) -> None:
    """Decision log and summary as artifacts; trial runs still open are closed; the parent ends."""
    from orchestrator.tracking import records

    if summary is not None:
        records.set_tags(sweep.uri, sweep.parent_run_id, {schema.REFERENCE_CACHE_KEY_TAG: summary["reference_cache_key"] or ""})
        records.log_text_artifact(sweep.uri, sweep.parent_run_id, schema.DECISION_LOG_ARTIFACT,
                                  json.dumps(summary["decision_log"], indent=1, default=str))
        records.log_text_artifact(sweep.uri, sweep.parent_run_id, schema.SWEEP_SUMMARY_ARTIFACT,
                                  json.dumps(summary, indent=1, default=str))
        best = summary["best"] or {"config": {}}  # the parent run's own metrics: the runs table shows them
        records.log_summary_metrics(sweep.uri, sweep.parent_run_id, {
            schema.SWEEP_BEST_SCORE_METRIC: best.get("metric"), schema.SWEEP_BEST_BETA_METRIC: best["config"].get("beta"),
            schema.SWEEP_TRIALS_METRIC: len(summary["trials"])})
    records.close_stale_runs(sweep.uri, sweep.experiment, sweep.sweep, keep=[sweep.parent_run_id])
    records.end_run(sweep.uri, sweep.parent_run_id, "FAILED" if error else "FINISHED", error=error)


def summarize(results, experiment: Experiment, cache_key: str | None) -> dict[str, Any]:
    """Best trial, every trial's final metrics and the searcher's decision log, as plain data (sweep_summary.json)."""
    sweep = experiment.sweep
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trials.append({
            "trial_id": metrics.get("trial_id"),
            "config": {**(result.config or {}), **experiment.run.trial_values(result.config or {})},
            "metric": metrics.get(sweep.metric), "step": metrics.get("step"),
            "error": str(result.error) if result.error else None, "path": result.path,
            "step_seconds": metrics.get("perf/step_seconds_total"), "eval_seconds": metrics.get("perf/eval_seconds_total"),
            "ray_train_start_seconds": metrics.get("perf/ray_train_start_seconds"),
            "reference_wait_seconds": metrics.get("perf/reference_wait_seconds"), "load_seconds": metrics.get("perf/load_seconds"),
            "trial_seconds": metrics.get("time_total_s"),  # Tune: from the trial's start to its last report
            "trial_started_at": metrics.get("perf/trial_started_at"),  # when the trial function started (epoch s)
        })
    scored = [t for t in trials if isinstance(t["metric"], (int, float)) and math.isfinite(t["metric"]) and not t["error"]]
    reverse = sweep.mode == "max"
    best = sorted(scored, key=lambda t: t["metric"], reverse=reverse)[0] if scored else None
    return {"name": experiment.name, "metric": sweep.metric, "mode": sweep.mode, "best": best,
            "trials": trials, "reference_cache_key": cache_key,
            "decision_log": read_decision_log(experiment.layout), "storage": experiment.layout.root,
            "trial_mode": sweep.trial_mode}


def read_decision_log(layout: StorageLayout) -> list[dict[str, Any]]:
    """The incremental searcher's decision log, from its newest saved state in the sweep folder.

    Newest by name, as Tune's own restore picks it (the name holds the session's start time): after
    `--resume` Tune's storage sync copies the first session's file again, so modification times mislead.
    The searcher reads its own state file; after `--resume` the searcher that ran lives inside Tune.
    """
    from orchestrator.ray.searchers import IncrementalBetaSearcher

    for state in reversed(layout.searcher_states()):
        searcher = IncrementalBetaSearcher()
        try:
            searcher.restore(str(state))
        except (ValueError, KeyError, TypeError):
            continue
        return searcher.decisions()
    return []


def start_tracking(tracking: TrackingSpec, layout: StorageLayout) -> Callable[[], str | None]:
    """Resolve the tracking URI; returns a call that gives it (None when tracking is off) once it is usable.

    A server the user named (tracking.uri, MLFLOW_TRACKING_URI) is checked now, so an unreachable one fails
    before any Ray work. The embedded server boots in a background thread (several seconds of imports)
    while Ray starts and the reference log-probs are computed; the returned call waits for it.
    """
    if not tracking.enabled:
        return lambda: None
    from orchestrator.tracking.server import prepare_tracking_uri, resolve_tracking_uri

    if not resolve_tracking_uri(tracking.uri, layout.storage)[1]:
        uri = prepare_tracking_uri(tracking.uri, layout.storage)
        return lambda: uri
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-mlflow")
    booting = pool.submit(prepare_tracking_uri, tracking.uri, layout.storage)
    pool.shutdown(wait=False)  # the thread ends when the server is up (or failed); result() waits for it
    return booting.result


def as_stored(experiment: Experiment) -> Experiment:
    """On --resume: the experiment with the trial mode its stored trials ran with (a sweep started in the
    other mode, e.g. by an earlier version, resumes its trials from their own checkpoints)."""
    stored = experiment.layout.ran_trials_as()
    if stored is None or stored == experiment.sweep.trial_mode:
        return experiment
    logger.info("--resume: the sweep %s ran its trials as %s; they continue that way", experiment.name, stored)
    return replace(experiment, sweep=replace(experiment.sweep, trial_mode=stored),
                   layout=replace(experiment.layout, trial_mode=stored))


def run_sweep(experiment: Experiment, *, address: str | None = None, resume: bool = False,
              force_config_change: bool = False,
              console=None) -> dict[str, Any]:
    """The whole `dpo sweep` of a resolved experiment; returns the summary. console: the Tune callback of
    orchestrator/console.py that shows the trials (None: Tune's own status table)."""
    import ray

    from orchestrator.ray.cluster import check_cluster_fits, check_storage_is_shared, local_resources, start_ray
    from orchestrator.ray.handoff import SETUP_FAILED
    from orchestrator.ray.reference_task import REFERENCE_FAILED, DriverReference, ReferenceTask
    from orchestrator.ray.trial import SharedRefs, TrialTracking
    from orchestrator.ray.tuner import build_tuner, tune_pending_trials
    from orchestrator.tracking.metric_journal import replay_journals
    from orchestrator.tracking.records import write_config_yaml
    from orchestrator.workflows.config_change import check_resume_config
    from orchestrator.workflows.run_lock import release_driver_lock, take_driver_lock
    from trainables.entrypoints import load_preference_data

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # eval metrics arrive every eval_every steps
    spec, layout = experiment.run, experiment.layout
    # 1) Bad data fails first: before a server or Ray starts and before anything is written.
    data = load_preference_data(spec.model, spec.data, token_stores=layout.token_stores)  # writes nothing
    logger.info("data ok: %d training pairs, %d held-out pairs", len(data.train), len(data.eval))
    from orchestrator.workflows.plan import refuse_unfit_sweep

    refuse_unfit_sweep(experiment)  # a trial whose GPU it cannot fit (dpo plan) is refused before Ray starts
    if resume and not layout.exists():
        raise ConfigError(f"--resume: no sweep named {experiment.name!r} under {layout.storage} ({layout.root})")
    if resume:
        experiment = as_stored(experiment)
        layout = experiment.layout
        if layout.config_file is not None:  # a result key changed since the sweep started: refused (or forced)
            check_resume_config(layout.config_file, experiment.resolved_config(), force=force_config_change,
                                command="dpo sweep --resume")
    started_here = not ray.is_initialized()
    if started_here and not address:
        check_cluster_fits(spec.resources, local_resources())  # a local Ray's size is known before it starts
    tracking_uri_when_ready = start_tracking(experiment.tracking, layout)  # an unreachable given server fails here
    # one driver per sweep name: a second one is refused here, before Ray starts (run_lock.py)
    lock = take_driver_lock(None if layout.remote else layout.root, "sweep")
    # 2) Ray, MLflow
    if started_here:
        try:
            start_ray(address, spec.resources)
        except BaseException:
            release_driver_lock(lock)
            raise
    sweep_records, opening, handoff = None, None, None
    try:
        if layout.config_file is not None and (not resume or force_config_change or not layout.config_file.is_file()):
            write_config_yaml(layout.config_file, experiment.resolved_config())  # what --resume compares with
        if started_here and address:  # trials may land on other nodes: what they share must be shared
            check_storage_is_shared(experiment)
        data = data.stored()  # written once under layout.token_stores; trials and the reference task memory-map it
        data_ref = ray.put(data)  # the tokenizer and the store's paths (all pairs when storage is an object store)
        # 3) the reference pass, overlapping Tune's start
        REFERENCE_FAILED.clear()  # an earlier sweep's failed reference task (this process) must not stop this one
        SETUP_FAILED.clear()  # nor its parent run that could not be opened
        precomputed = spec.preference.reference_mode == "precomputed"
        in_driver = started_here and not address and not spec.resources.use_gpu  # DriverReference's docstring
        reference = None if not precomputed else DriverReference(spec, data) if in_driver else ReferenceTask(spec, data_ref)
        tracking = None
        if experiment.tracking.enabled and not resume:  # opened while Tune starts; the first trials wait for it
            opening, handoff = open_sweep_run_meanwhile(experiment, tracking_uri_when_ready)
        elif experiment.tracking.enabled:  # --resume: the killed driver's points are replayed before any trial
            sweep_records = open_sweep_run(experiment, tracking_uri_when_ready(), resume)
            if layout.metric_journals is not None:  # points the killed driver's trials never delivered
                replay_journals(sweep_records.uri, layout.metric_journals)
        if experiment.tracking.enabled:
            run = ((sweep_records.uri, sweep_records.experiment_id, sweep_records.parent_run_id) if sweep_records
                   else (None, None, None))  # a fresh sweep's trials get them through the handoff
            tracking = TrialTracking(*run, experiment.name,
                                     journal_dir=None if layout.metric_journals is None else str(layout.metric_journals),
                                     system_metrics=experiment.tracking.system_metrics, handoff=handoff)
        if reference is not None:
            reference.watch()
            if spec.resources.use_gpu:  # trials' placement groups could otherwise take every GPU the pass needs
                from orchestrator.ray.reference_task import wait_for_reference

                wait_for_reference(reference.ref, experiment.sweep.reference_wait_s, f"sweep {experiment.name}")
        # 4) the trials
        shared = SharedRefs(data=data_ref, reference_ready=reference.ref if reference else None,
                            reference_wait_s=experiment.sweep.reference_wait_s,
                            reference_key=reference.key() if isinstance(reference, DriverReference) else None)
        with tune_pending_trials(experiment.sweep):  # an incremental round's trials are placed together
            results = build_tuner(experiment, resume, tracking, shared, console=console).fit()
        # 5) the summary
        if opening is not None:
            sweep_records = opening.result()  # raises the error that stopped the sweep, if opening failed
        cache_key = reference.result() if reference is not None else None  # raises the task's error, if any
        summary = summarize(results, experiment, cache_key)
        if sweep_records:
            close_sweep_run(sweep_records, summary, error=None)
            summary["mlflow"] = {"uri": sweep_records.uri, "parent_run_id": sweep_records.parent_run_id,
                                 "experiment_id": sweep_records.experiment_id}
    except BaseException as error:
        if sweep_records is None and opening is not None:  # opened (or opening) but the sweep failed: run FAILED
            done, _ = concurrent.futures.wait([opening], timeout=30)
            sweep_records = opening.result() if done and opening.exception() is None else None
        if sweep_records:
            close_sweep_run(sweep_records, None, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if opening is not None and not started_here:  # a joined Ray outlives this sweep (a study runs several)
            ray.kill(handoff)
        if started_here:
            ray.shutdown()
        release_driver_lock(lock)
    if layout.summary_file is not None:
        from orchestrator.redaction import redact

        layout.summary_file.write_text(json.dumps(redact(summary), indent=1, default=str))  # no password in a file
    return summary


def read_summary(layout: StorageLayout) -> dict[str, Any] | None:
    """The summary a finished sweep wrote (None if it has not finished here)."""
    if layout.summary_file is None or not layout.summary_file.is_file():
        return None
    return json.loads(layout.summary_file.read_text())
