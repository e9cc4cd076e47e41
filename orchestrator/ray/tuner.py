"""The Tuner of a sweep: Tune over Train, as in Ray's Train+Tune example.

Tune proposes (beta, kl_weight, learning_rate) with the configured searcher; each trial is the function
trainable orchestrator.ray.trial.run_trial, which runs one Ray Train job. The one invariant: a trial's
folder is named by its trial id alone (no timestamps), so `--resume` finds its checkpoints again.
"""

from __future__ import annotations

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

        space = grid_or_random_search_space(sweep.beta, sweep.kl_weight, sweep.learning_rate, "random")
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode), space, sweep.max_trials
    space = grid_or_random_search_space(sweep.beta, sweep.kl_weight, sweep.learning_rate, sweep.strategy)
    return None, space, 1 if sweep.strategy == "grid" else sweep.max_trials


def build_tuner(experiment: Experiment, resume: bool, tracking: TrialTracking | None = None,
                shared: SharedRefs = SharedRefs()):
    """The sweep's Tuner (restored from its folder on resume); shared: what every trial worker reads."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.ray.trial import run_trial

    layout, sweep, loop = experiment.layout, experiment.sweep, experiment.run.loop
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=experiment.run, trials_storage=layout.trials, tracking=tracking, shared=shared),
        {"cpu": 0, "memory": 1},  # the trial driver only waits (Ray needs a non-empty bundle); its Train workers reserve CPUs/GPUs
    )
    if resume:
        return tune.Tuner.restore(layout.root, trainable=trainable, resume_unfinished=True, resume_errored=False)
    search_alg, space, num_samples = searcher_and_space(sweep)
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=loop.max_steps, grace_period=max(1, loop.eval_every))
    storage_root, name = layout.storage, layout.name
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=num_samples, max_concurrent_trials=sweep.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,  # the next trial's driver runs in the finished one's process: no new Python start-up
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_root, failure_config=tune.FailureConfig(max_failures=0),
                                  stop=reference_stopper()),
    )


