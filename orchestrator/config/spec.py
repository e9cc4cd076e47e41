"""The run spec: a validated config resolved, once, into frozen, typed, torch-free values.

    ExperimentConfig (schema.py, validated by loading.py)
        -> resolve_run(...)        RunSpec: the engine's argument groups + resources + MLflow params
        -> resolve_experiment(...) Experiment: the RunSpec, the StorageLayout, the SweepSpec, tracking

These objects, not the config, cross every boundary: they are pickled into Ray tasks and Train workers,
logged to MLflow (RunSpec.params) and written to disk. Nothing downstream re-validates them or fills in
a default: every value comes from the config's schema. A sweep trial is the sweep's RunSpec with the
searched values replaced (`for_trial`); a worker's is the trial's with its own folder and device
(`on_worker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from orchestrator.config.incremental import IncrementalBetaSettings, beta_prior, settings_from_sweep
from orchestrator.config.layout import DEFAULT_REFERENCE_CACHE, StorageLayout
from orchestrator.config.schema import ExperimentConfig
from orchestrator.errors import ConfigError
from orchestrator.tracking.schema import LOSS_PARAM, SEARCHED_PARAMS
from trainables.settings import DataArgs, LoopSettings, ModelArgs, PreferenceArgs, RuntimeArgs

SearchValues = Any  # a number, a tuple of numbers, or a {min, max, log} range (validated by the schema)


@dataclass(frozen=True)
class Resources:
    """What one trial (or training job) asks Ray for, and how it survives failures."""

    num_workers: int  # Ray Train workers (data-parallel ranks)
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    strategy: str  # ddp | fsdp
    max_failures: int  # worker-group restarts from the last checkpoint (-1: unlimited)
    keep_checkpoints: int | None

    @property
    def cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run needs: what the engine takes, what Ray reserves, what MLflow records."""

    name: str
    stage: str  # dpo | sft
    model: ModelArgs
    data: DataArgs
    preference: PreferenceArgs
    loop: LoopSettings
    runtime: RuntimeArgs
    resources: Resources
    params: tuple[tuple[str, Any], ...]  # the resolved config as dotted keys (MLflow params)

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def for_trial(self, trial_config: Mapping[str, Any]) -> "RunSpec":
        """This spec with a trial's searched values (beta, kl_weight, learning_rate, loss) in place.

        A trial with a `loss` of its own (sweep.loss) runs it with the dpo.* options, without a reference when
        it is reference-free, and at its loss's prior beta (beta_prior) when the sweep searches no beta."""
        values = {key: float(trial_config[key]) for key in SEARCHED_PARAMS if key in trial_config}
        preference, extra = self.preference, {}
        if "loss" in trial_config:
            loss = preference.loss.with_names((str(trial_config["loss"]),))
            values.setdefault("beta", beta_prior(loss.names))
            preference = replace(preference, loss=loss,
                                 reference_mode=preference.reference_mode if loss.needs_reference else "none")
            extra = {LOSS_PARAM: loss.names[0], "reference.mode": preference.reference_mode}
        preference = replace(preference, **{k: v for k, v in values.items() if k in ("beta", "kl_weight")})
        loop = replace(self.loop, learning_rate=values.get("learning_rate", self.loop.learning_rate))
        params = {**self.param_dict(), **{SEARCHED_PARAMS[key]: value for key, value in values.items()}, **extra}
        return replace(self, preference=preference, loop=loop, params=tuple(params.items()))

    def trial_values(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """The beta, kl_weight and learning_rate a trial runs with, whether searched or not (a trial of a loss
        dimension without a beta dimension runs at its loss's prior beta, which its config does not hold)."""
        spec = self.for_trial(trial_config)
        return {"beta": spec.preference.beta, "kl_weight": spec.preference.kl_weight,
                "learning_rate": spec.loop.learning_rate}

    def on_worker(self, *, output_dir: str, device: str, resume_from: str | None) -> "RunSpec":
        """This spec as one Ray Train worker runs it: its own scratch folder and device, no progress bars."""
        return replace(self, loop=replace(self.loop, output_dir=output_dir, show_progress=False),
                       runtime=replace(self.runtime, device=device, resume_from=resume_from, show_progress=False))


@dataclass(frozen=True)
class SweepSpec:
    """How a sweep proposes trials (orchestrator/ray/tuner.py)."""

    strategy: str  # incremental_beta | grid | random | optuna
    metric: str
    mode: str  # max | min
    scheduler: str  # none | asha
    max_trials: int
    max_concurrent_trials: int | None
    beta: SearchValues
    kl_weight: SearchValues
    learning_rate: SearchValues
    loss: tuple[str, ...] | None  # sweep.loss: the loss dimension (grid/random/optuna); None: dpo.loss for all
    incremental: IncrementalBetaSettings | None  # strategy incremental_beta only
    trial_mode: str  # warm: the engine in Tune's reused trial actor; train: a TorchTrainer per trial
    reference_wait_s: float = 21600.0  # reference.wait_timeout_s: the longest wait for the reference pass
    fail_fast: bool = False  # failure.fail_fast: a trial failed for good stops the sweep (else the others go on)


@dataclass(frozen=True)
class TrackingSpec:
    enabled: bool
    uri: str | None  # tracking.uri as configured (None: MLFLOW_TRACKING_URI, else the embedded server)
    experiment: str  # MLflow experiment name
    system_metrics: bool = False  # each trial's rank 0 logs MLflow system metrics (CPU, memory, GPU)


@dataclass(frozen=True)
class Experiment:
    """A sweep (or study) resolved: its base run, where it lives, how it searches, where it is recorded."""

    name: str
    run: RunSpec
    layout: StorageLayout
    sweep: SweepSpec
    tracking: TrackingSpec
    config_json: str  # the resolved config, for the records (config.yaml artifact of the parent run)

    def resolved_config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


# ---- resolution -------------------------------------------------------------------------------------

def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"dpo": {"beta": 0.1}} -> {"dpo.beta": 0.1} (an empty mapping stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _model(config: ExperimentConfig) -> ModelArgs:
    model, lora = config.model, config.model.lora
    targets = None if lora is None else (lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules))
    return ModelArgs(path=model.path, tokenizer_path=model.tokenizer_path, revision=model.revision,
                     trust_remote_code=model.trust_remote_code, dtype=model.dtype,
                     attn_implementation=model.attn_implementation, disable_dropout=model.disable_dropout,
                     lora_rank=lora.r if lora else None, lora_alpha=lora.alpha if lora else 0.0,
                     lora_dropout=lora.dropout if lora else 0.0, lora_target_modules=targets or "all-linear")


def _data(config: ExperimentConfig, stage: str) -> DataArgs:
    data = config.data
    if stage == "sft" and not data.sft_train:
        raise ConfigError("data.sft_train: required for SFT (prompt/completion examples), e.g. data.sft_train: sft.jsonl")
    return DataArgs(train=data.sft_train if stage == "sft" else data.train,
                    eval=data.sft_eval if stage == "sft" else data.eval,
                    train_split=data.train_split, eval_split=data.eval_split, layout=data.layout,
                    columns=tuple(sorted(data.columns.items())), max_length=data.max_length,
                    max_prompt_length=data.max_prompt_length, drop_invalid=data.drop_invalid,
                    max_invalid_fraction=data.max_invalid_fraction, eval_holdout=data.eval_holdout,
                    num_proc=data.num_proc)


def _preference(config: ExperimentConfig, reference_cache: str) -> PreferenceArgs:
    dpo, reference = config.dpo, config.reference
    return PreferenceArgs(beta=dpo.beta, kl_weight=dpo.kl_weight, loss=dpo.loss_spec(),
                          kl_estimator=dpo.kl_estimator, reference_mode=reference.mode, reference_path=reference.path,
                          reference_cache_dir=reference_cache, reference_batch_size=reference.batch_size)


def _loop(config: ExperimentConfig, workers: int, output_dir: str, show_progress: bool) -> LoopSettings:
    train = config.train
    if train.batch_size % workers:
        raise ConfigError(f"train.batch_size: {train.batch_size} pairs per step must be divisible by the {workers} "
                          "workers (resources.num_workers)")
    return LoopSettings(
        learning_rate=train.learning_rate, batch_size=train.batch_size,
        micro_batch_size=train.micro_batch_size or train.batch_size // workers, max_steps=train.max_steps,
        warmup_steps=train.warmup_steps, schedule=train.schedule, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, eval_every=train.eval_every, checkpoint_every=train.checkpoint_every,
        keep_checkpoints=train.keep_checkpoints, log_every=train.log_every, seed=train.seed,
        output_dir=output_dir, show_progress=show_progress)


def _runtime(config: ExperimentConfig, show_progress: bool) -> RuntimeArgs:
    train = config.train
    return RuntimeArgs(device=train.device, precision=train.precision,
                       gradient_checkpointing=train.gradient_checkpointing, eval_batch_size=train.eval_batch_size,
                       padding_buckets=train.padding_buckets, share_prompt=train.share_prompt,
                       resume_from=train.resume_from, show_progress=show_progress)


def _resources(config: ExperimentConfig) -> Resources:
    resources = config.resources
    return Resources(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                     cpus_per_worker=resources.cpus_per_worker, gpus_per_worker=resources.gpus_per_worker,
                     strategy=resources.strategy, max_failures=config.failure.max_failures,
                     keep_checkpoints=config.train.keep_checkpoints)


def resolve_run(config: ExperimentConfig, *, stage: str = "dpo", workers: int = 1, reference_cache: str | None = None,
                output_dir: str | None = None, show_progress: bool = True) -> RunSpec:
    """One run of the config: `dpo train` / `dpo sft` (workers=1), or the base of a sweep's trials.

    reference_cache: where precomputed reference log-probs go (default reference.cache_dir, else the
    per-user cache); output_dir: default the config's output_dir.
    """
    cache = reference_cache or config.reference.cache_dir or str(Path(DEFAULT_REFERENCE_CACHE).expanduser())
    return RunSpec(name=config.name, stage=stage, model=_model(config), data=_data(config, stage),
                   preference=_preference(config, cache),
                   loop=_loop(config, workers, output_dir or str(config.output_dir), show_progress),
                   runtime=_runtime(config, show_progress), resources=_resources(config),
                   params=tuple(flatten(config.model_dump()).items()))


def trial_mode(config: ExperimentConfig) -> str:
    """How a sweep runs its trials: `warm` (the engine inside Tune's reused trial actor, one worker) or
    `train` (a Ray Train TorchTrainer per trial). resources.trial_mode `auto` (the default) is warm for
    one worker per trial and train for several (docs/sweeps.md#warm-trials)."""
    resources = config.resources
    mode = getattr(resources, "trial_mode", "auto")
    if mode == "auto":
        return "warm" if resources.num_workers == 1 else "train"
    if mode == "warm" and resources.num_workers != 1:
        raise ConfigError(f"resources.trial_mode: warm runs one worker per trial, but resources.num_workers is "
                          f"{resources.num_workers}; set trial_mode to auto or train, or num_workers to 1")
    return mode


def _sweep(config: ExperimentConfig) -> SweepSpec:
    sweep = config.sweep
    # With a loss dimension and no beta values, each trial takes its loss's prior beta (RunSpec.for_trial).
    searched_losses = tuple(sweep.loss) if sweep.loss is not None and sweep.strategy != "incremental_beta" else None
    beta = sweep.beta if sweep.beta is not None or searched_losses else config.dpo.beta
    kl_weight = sweep.kl_weight if sweep.kl_weight is not None else config.dpo.kl_weight
    learning_rate = sweep.learning_rate if sweep.learning_rate is not None else config.train.learning_rate
    as_tuple = lambda value: tuple(float(v) for v in (value if isinstance(value, list) else [value]))
    incremental = None
    if sweep.strategy == "incremental_beta":
        incremental = settings_from_sweep(sweep, learning_rates=as_tuple(learning_rate), kl_weights=as_tuple(kl_weight),
                                          loss_names=config.dpo.loss_spec().names)
    return SweepSpec(strategy=sweep.strategy, metric=sweep.metric, mode=sweep.mode, scheduler=sweep.scheduler,
                     max_trials=sweep.max_trials, max_concurrent_trials=sweep.max_concurrent_trials, beta=beta,
                     kl_weight=kl_weight, learning_rate=learning_rate, loss=searched_losses, incremental=incremental,
                     trial_mode=trial_mode(config), reference_wait_s=config.reference.wait_timeout_s,
                     fail_fast=config.failure.fail_fast)


def resolve_experiment(config: ExperimentConfig) -> Experiment:
    """A sweep's (or study's) resolution: its trials' base RunSpec, its layout, its search, its tracking."""
    layout = StorageLayout.of(config.storage_path, config.name, config.reference.cache_dir, trial_mode(config))
    run = resolve_run(config, workers=config.resources.num_workers, reference_cache=layout.reference_cache,
                      output_dir=layout.trials, show_progress=False)
    tracking = TrackingSpec(enabled=config.tracking.enabled, uri=config.tracking.uri,
                            experiment=config.tracking.experiment or config.name,
                            system_metrics=config.tracking.system_metrics)
    return Experiment(name=config.name, run=run, layout=layout, sweep=_sweep(config), tracking=tracking,
                      config_json=json.dumps(config.model_dump(), default=str))
