"""The Tuner of a sweep: Tune over the engine (warm trials) or over Ray Train (multi-worker trials).

Tune proposes (beta, kl_weight, learning_rate, and the loss when sweep.loss lists several) with the
configured searcher. Each trial is a function
trainable of orchestrator/ray/trial.py, chosen by the sweep's trial mode:
- warm: `warm_trial` runs the engine in the trial actor, which reserves the trial's CPUs (and GPU share),
  so Tune runs as many trials at once as fit; the actor is reused by the next trial (no new Python, no new
  imports); Tune retries a failed trial from its last checkpoint (FailureConfig) and keeps
  keep_checkpoints of them (CheckpointConfig);
- train: `run_trial` fits one TorchTrainer per trial (its workers reserve the resources; Ray Train
  retries them and keeps the checkpoints).
The one invariant: a trial's folder is named by its trial id alone (no timestamps), so `--resume` finds
its checkpoints again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from orchestrator.config.spec import Experiment, SweepSpec
from orchestrator.ray.reference_task import reference_stopper
from orchestrator.ray.trial import SharedRefs, TrialTracking


def searcher_and_space(sweep: SweepSpec):
    """(search_alg, param_space, num_samples) for the configured strategy."""
    from orchestrator.ray.searchers import IncrementalBetaSearcher, grid_or_random_search_space

    if sweep.incremental is not None:
        return IncrementalBetaSearcher(sweep.incremental, metric=sweep.metric, mode=sweep.mode), {}, sweep.max_trials
    if sweep.strategy == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        space = grid_or_random_search_space(sweep.beta, sweep.kl_weight, sweep.learning_rate, "random", sweep.loss)
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode), space, sweep.max_trials
    space = grid_or_random_search_space(sweep.beta, sweep.kl_weight, sweep.learning_rate, sweep.strategy, sweep.loss)
    return None, space, 1 if sweep.strategy == "grid" else sweep.max_trials


def pending_trials(sweep: SweepSpec) -> int | None:
    """How many trials Tune may hold pending at once for this sweep (None: Tune's own choice).

    Tune lets a searcher of its own (BasicVariantGenerator: grid, random) have hundreds of trials pending, but
    any other searcher only one, unless max_concurrent_trials wraps it in a ConcurrencyLimiter. The incremental
    procedure's searcher hands out a whole round at once (one trial per learning_rate x kl_weight), so with one
    pending trial a fan-out started one trial at a time, and a short trial could end before the next was placed,
    which then ran in its actor after it instead of beside it. Its round's width is the most it ever has in
    flight, so allowing that many pending places a round's trials together as far as resources allow.
    """
    if sweep.incremental is None or sweep.max_concurrent_trials is not None:
        return None
    return len(sweep.incremental.learning_rates) * len(sweep.incremental.kl_weights)


@contextlib.contextmanager
def tune_pending_trials(sweep: SweepSpec) -> Iterator[None]:
    """While Tune's controller starts (in Tuner.fit), TUNE_MAX_PENDING_TRIALS_PG = pending_trials(sweep); a
    value the user exported wins, and the environment is restored after (a study runs several sweeps)."""
    count = pending_trials(sweep)
    if count is None or "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
        yield
        return
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(count)
    try:
        yield
    finally:
        os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)


def build_trainable(experiment: Experiment, tracking: TrialTracking | None = None, shared: SharedRefs = SharedRefs()):
    """The sweep's Tune trainable with what every trial reads, and what each trial reserves."""
    from ray import tune

    from orchestrator.ray.trial import trial_trainable, warm_resources

    warm = experiment.sweep.trial_mode == "warm"
    trainable = tune.with_parameters(trial_trainable(experiment.sweep.trial_mode), spec=experiment.run,
                                     layout=experiment.layout, tracking=tracking, shared=shared)
    # A Ray Train trial's driver only waits (Ray needs a non-empty bundle); its Train workers reserve CPUs/GPUs.
    return tune.with_resources(trainable, warm_resources(experiment.run.resources) if warm else {"cpu": 0, "memory": 1})


def build_tuner(experiment: Experiment, resume: bool, tracking: TrialTracking | None = None,
                shared: SharedRefs = SharedRefs(), console=None):
    """The sweep's Tuner (restored from its folder on resume); shared: what every trial reads; console: a Tune
    callback that replaces Tune's status table (orchestrator/console.py; a restored Tuner brings its pickled copy,
    which joins the running session's console)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    layout, sweep, loop, resources = experiment.layout, experiment.sweep, experiment.run.loop, experiment.run.resources
    trainable = build_trainable(experiment, tracking, shared)
    if resume:
        return tune.Tuner.restore(layout.root, trainable=trainable, resume_unfinished=True, resume_errored=False)
    search_alg, space, num_samples = searcher_and_space(sweep)
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=loop.max_steps, grace_period=max(1, loop.eval_every))
    # fail_fast: a trial that fails for good (its restarts used up) stops the sweep; otherwise the others go on
    if sweep.trial_mode == "warm":  # Tune restarts a failed trial from its last checkpoint, and keeps the newest ones
        failure = tune.FailureConfig(max_failures=resources.max_failures, fail_fast=sweep.fail_fast)
        checkpoints = tune.CheckpointConfig(num_to_keep=resources.keep_checkpoints)
    else:  # Ray Train restarts a trial's workers and keeps its checkpoints
        failure, checkpoints = tune.FailureConfig(max_failures=0, fail_fast=sweep.fail_fast), None
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=num_samples, max_concurrent_trials=sweep.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,  # the next trial runs in a finished one's actor: no new Python start-up or imports
        ),
        run_config=tune.RunConfig(name=layout.name, storage_path=layout.storage, failure_config=failure,
                                  checkpoint_config=checkpoints, stop=reference_stopper(),
                                  callbacks=[console] if console else None, verbose=0 if console else None),
    )
