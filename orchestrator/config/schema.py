"""The typed experiment config: every section, key, default, bound and cross-key rule, in one place.

Every field carries a one-line description (`dpo config-reference` prints them as a table); unknown keys
and bad values are errors that name the key (`dpo.beta: must be > 0 (got -1)`). This is the only place
defaults and value rules live: orchestrator/config/loading.py reads a YAML file into this model once, at
the CLI edge, and orchestrator/config/spec.py resolves it into the frozen run spec the rest of the code
takes. Importing it imports no torch.
"""

from __future__ import annotations

import math

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator.config.incremental import STEP_RANGE, default_of
from orchestrator.config.search_values import check_search_values, refuse_booleans
from orchestrator.config.study_schema import BenchmarkEntry, StudySection, check_study
from orchestrator.config.value_rules import (MAX_BATCH, MAX_CPUS, MAX_GPUS, MAX_LORA_RANK, MAX_PADDING_BUCKETS,
                                             MAX_ROUNDS, MAX_ROWS, MAX_SEED, MAX_STEPS, MAX_TOKENS, MAX_TRIALS,
                                             MAX_WORKERS, at_most, check_scalar_kind)
from orchestrator.tracking.schema import NAME_PATTERN
from trainables.precision import check_weight_dtype
from trainables.loss_options import F_DIVERGENCES, LOSS_NAMES, LossSpec, check_loss_spec
from trainables.settings import check_padding_buckets, check_share_prompt


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # .inf / .nan are errors

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_kind(cls, value: Any, info: ValidationInfo) -> Any:
        """true is not a number and 1 is not true (orchestrator/config/value_rules.py)."""
        return check_scalar_kind(value, cls.model_fields[info.field_name].annotation)


class LoraSection(Section):
    r: int = Field(8, gt=0, le=MAX_LORA_RANK, description="LoRA rank" + at_most(MAX_LORA_RANK))
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters (peft syntax)")


class ModelSection(Section):
    path: str = Field(description="Policy model: a save_pretrained directory or a hub name; `demo:model` is the embedded default")
    tokenizer_path: str | None = Field(None, description="Tokenizer location when it differs from model.path")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model to run; off unless you trust it")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the weights are stored in: float32 for trained weights (compute in bf16 with train.precision); bfloat16 only for a frozen base under model.lora; float16 is refused (no loss scaler)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel")
    disable_dropout: bool = Field(True, description="Zero all dropout so step 0 starts exactly at ln 2 (as TRL does)")
    lora: LoraSection | None = Field(None, description="Train LoRA adapters (needs the `lora` extra: peft) instead of all weights")


class DataSection(Section):
    train: str = Field(description="Training pairs: .jsonl/.json/.parquet/.csv file or a hub dataset name")
    eval: str | None = Field(None, description="Held-out pairs for eval/ metrics (file or hub name)")
    train_split: str = Field("train", description="Split of train when it is a hub dataset")
    eval_split: str = Field("test", description="Split of eval when it is a hub dataset")
    layout: Literal["auto", "explicit", "conversational", "implicit_prompt"] = Field("auto", description="Pair layout; auto detects it")
    columns: dict[str, str] = Field(default_factory=dict, description="Column mapping, e.g. {prompt: question, chosen: good}")
    max_length: int = Field(512, gt=1, le=MAX_TOKENS, description="Max tokens of prompt + answer; prompt cut from the left first, then answers from the right" + at_most(MAX_TOKENS))
    max_prompt_length: int | None = Field(None, gt=0, le=MAX_TOKENS, description="Max prompt tokens when truncating (default max_length // 2)" + at_most(MAX_TOKENS))
    drop_invalid: bool = Field(False, description="Drop bad rows (counted and logged) instead of failing")
    max_invalid_fraction: float = Field(0.05, ge=0, le=1, description="With drop_invalid: fail if more than this fraction is bad")
    eval_holdout: int = Field(0, ge=0, le=MAX_ROWS, description="Without data.eval: hold out this many training rows for evaluation" + at_most(MAX_ROWS))
    num_proc: int | None = Field(None, ge=1, le=MAX_CPUS, description="Processes that validate and tokenise the data; null: auto = the usable CPUs (at most 8), but 1 under 20,000 rows; the result is the same for any number" + at_most(MAX_CPUS))
    sft_train: str | None = Field(None, description="SFT examples (prompt/completion or messages) for `dpo sft`")
    sft_eval: str | None = Field(None, description="Held-out SFT examples")


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward (docs/method.md, 'What beta does')")
    kl_weight: float = Field(0.0, ge=0, description="lambda: weight of the explicit KL(pi || pi_ref) penalty on answer tokens")
    loss: str | list[str] = Field("sigmoid", description=f"Preference loss, or a list of losses summed with dpo.loss_weights (sigmoid + sft is RPO); one of: {', '.join(LOSS_NAMES)} (docs/method.md)")
    loss_weights: list[float] | None = Field(None, description="With a list of losses: one weight > 0 per loss (default all 1)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="eps: assumed fraction of flipped labels (cdpo, robust, exo_pair, aot, aot_unpaired, simpo)")
    f_divergence: Literal[F_DIVERGENCES] = Field("reverse_kl", description="f-DPO divergence of the losses built on the chosen-minus-rejected score (reverse_kl is plain DPO)")
    f_alpha: float = Field(0.5, description="alpha of f_divergence alpha_divergence (TRL's f_alpha_divergence_coef)")
    use_weighting: bool = Field(False, description="WPO: weight each pair by the policy's length-normalised probability of both answers")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO: weight of the tokens past the shorter answer's length (1 = plain sums); null: off")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma")
    discopop_tau: float = Field(0.05, gt=0, description="discopop: temperature tau of its log-ratio modulation")
    kl_estimator: Literal["k2", "exact"] = Field("k2", description="The kl_weight penalty: k2 = (log-ratio)^2 / 2 on the answer tokens (works with cached log-probs); exact = full-vocabulary KL (needs reference.mode=live)")

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_names(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:  # --set dpo.loss=sigmoid,sft
            return [name.strip() for name in value.split(",")]
        return value

    def loss_spec(self) -> LossSpec:
        """The loss as the engine builds it (trainables/loss_options.py); checked by check_loss_spec."""
        names = (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)
        weights = tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(names)
        return LossSpec(names=names, weights=weights, label_smoothing=self.label_smoothing,
                        f_divergence=self.f_divergence, f_alpha=self.f_alpha, use_weighting=self.use_weighting,
                        ld_alpha=self.ld_alpha, simpo_gamma=self.simpo_gamma, discopop_tau=self.discopop_tau)


class TrainSection(Section):
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Pairs per optimizer step, over all workers" + at_most(MAX_BATCH))
    micro_batch_size: int | None = Field(None, gt=0, le=MAX_BATCH, description="Pairs per forward/backward per worker (gradient accumulation); default batch_size / workers" + at_most(MAX_BATCH))
    max_steps: int = Field(500, gt=0, le=MAX_STEPS, description="Optimizer steps" + at_most(MAX_STEPS))
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps" + at_most(MAX_STEPS))
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases / norms)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables")
    eval_every: int = Field(100, gt=0, le=MAX_STEPS, description="Held-out evaluation every N steps (and at the end)" + at_most(MAX_STEPS))
    checkpoint_every: int = Field(100, gt=0, le=MAX_STEPS, description="Checkpoint every N steps (and at the end)" + at_most(MAX_STEPS))
    keep_checkpoints: int | None = Field(2, gt=0, le=MAX_STEPS, description="Keep only the newest N checkpoints; null keeps all" + at_most(MAX_STEPS))
    log_every: int = Field(10, gt=0, le=MAX_STEPS, description="Report train/ metrics (window means) every N steps; step 1 always" + at_most(MAX_STEPS))
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the data order and initialisation, 0 to 2^32 - 1")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Compute dtype: bf16 = bf16 autocast over fp32 master weights (FSDP: bf16 mixed precision); auto = bf16 on a CUDA GPU that supports it, fp32 elsewhere")
    gradient_checkpointing: bool = Field(False, description="Recompute each decoder layer in backward instead of keeping its activations (non-reentrant; same losses and gradients, less memory, about one more forward of time)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (single-process runs)")
    eval_batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Pairs per evaluation forward" + at_most(MAX_BATCH))
    padding_buckets: int | str = Field("auto", description=f"Forwards per micro-batch, rows grouped by length to cut padding (same math): auto (padding vs per-forward cost) or K from 1 to {MAX_PADDING_BUCKETS:,}; 1 = one padded batch")
    share_prompt: bool | Literal["auto"] = Field("auto", description="DPO: each prompt computed once for chosen and rejected (one row per pair, 4D mask; same math): auto (eager/sdpa attention, it saves >= 10% of padded tokens and a first-batch probe agrees), true (required), false")
    resume_from: str | None = Field(None, description="Checkpoint folder or `latest` (under output_dir) to resume from")
    overwrite_output_dir: bool = Field(False, description="dpo train/sft: replace the run already in output_dir (its metrics.jsonl, config.yaml, run.json and checkpoints) instead of refusing to start")
    preemption_grace_s: float = Field(60.0, gt=0, le=86_400, description="dpo train/sft: on SIGTERM or SIGINT, seconds to finish the step in progress and write its checkpoint before stopping (exit status 75); a second signal stops at once. At most 86,400")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("padding_buckets", mode="before")
    @classmethod
    def _padding_buckets(cls, value: Any) -> int | str:
        value = check_padding_buckets(value)  # "auto" or an int >= 1; bools, floats and other strings are errors
        if isinstance(value, int) and value > MAX_PADDING_BUCKETS:
            raise ValueError(f"must be \"auto\" or an integer from 1 to {MAX_PADDING_BUCKETS:,}")
        return value

    @field_validator("share_prompt", mode="before")
    @classmethod
    def _share_prompt(cls, value: Any) -> bool | Literal["auto"]:
        return check_share_prompt(value)  # "auto", true or false; anything else is an error


class ReferenceSection(Section):
    mode: Literal["precomputed", "live", "none"] = Field("precomputed", description="precomputed: cached once; live: reference model in memory; none: reference-free")
    path: str | None = Field(None, description="Reference model (default: model.path, the model DPO starts from)")
    cache_dir: str | None = Field(None, description="Where precomputed log-probs are cached (default: <storage_path>/<name>/reference_cache in sweeps and studies, ~/.cache/dpo-orchestrator/reference for dpo train)")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Pairs per reference forward while precomputing" + at_most(MAX_BATCH))
    wait_timeout_s: float = Field(21600, gt=0, description="In a sweep: how long a trial (and, with GPUs, the driver before the first trial) waits for the precomputed reference pass before failing; the wait is logged every minute")


SearchValues = float | list[float] | dict[str, Any] | None


class SweepSection(Section):
    strategy: Literal["incremental_beta", "grid", "random", "optuna"] = Field("incremental_beta", description="How trials are proposed; incremental_beta: the procedure of docs/method.md")
    max_trials: int = Field(20, gt=0, le=MAX_TRIALS, description="Upper bound on trials (random/optuna: the number of samples)" + at_most(MAX_TRIALS))
    max_concurrent_trials: int | None = Field(None, gt=0, le=MAX_WORKERS, description="Trials running at once (default: as many as resources allow)" + at_most(MAX_WORKERS))
    beta: SearchValues = Field(None, description="grid: list; random/optuna: list or {min, max, log}; incremental: unused (see start_beta); with sweep.loss and no beta: each loss's own prior (docs/sweeps.md)")
    loss: list[str] | None = Field(None, description="grid: every loss of the list; random/optuna: a categorical choice (each with the dpo.* options); incremental: unused (the loss is dpo.loss, fixed per sweep)")
    kl_weight: SearchValues = Field(None, description="Values of lambda; incremental: the fan-out list of each round (default [dpo.kl_weight])")
    learning_rate: SearchValues = Field(None, description="Learning rates; incremental: the fan-out list of each round (default [train.learning_rate])")
    scheduler: Literal["none", "asha"] = Field("none", description="Early stopping of weak trials (ASHA on sweep.metric)")
    metric: str = Field("eval/preference_accuracy", description="What the sweep maximises (or minimises, see mode)")
    mode: Literal["max", "min"] = Field("max", description="Direction of sweep.metric")
    task: Literal["simple", "complex"] | None = Field(None, description="Task prior: simple starts beta at 0.5 (0.5-1.0), complex at 0.1 (0.1-0.3)")
    start_beta: float | None = Field(None, gt=0, description="First beta of the incremental procedure (default: the loss's prior, 0.1 for sigmoid, or the task prior)")
    min_beta: float | None = Field(None, gt=0, description="Lowest beta a back-off or the downward exploration may reach (default 0.005 on sigmoid's scale)")
    max_beta: float | None = Field(None, gt=0, description="Highest beta the climb may reach")
    step: float = Field(default_of("step"), ge=STEP_RANGE[0], le=STEP_RANGE[1], description="Beta increase per improving round (0.1 to 0.2)")
    explore_down: bool = Field(default_of("explore_down"), description="When the start round or the first climb fails (backoff halve_step): try start x 0.5, 0.2, 0.1, 0.05 before stopping (docs/method.md)")
    backoff: Literal["halve_step", "raise_kl_weight"] = Field(default_of("backoff"), description="On oscillation or a drop: lower beta by half a step, or raise kl_weight")
    kl_weight_factor: float = Field(default_of("kl_weight_factor"), gt=1, description="raise_kl_weight: multiply kl_weight by this")
    patience: int = Field(default_of("patience"), gt=0, le=MAX_ROUNDS, description="Stop after this many rounds in a row without improvement" + at_most(MAX_ROUNDS))
    max_rounds: int = Field(default_of("max_rounds"), gt=0, le=MAX_ROUNDS, description="Hard limit on incremental rounds" + at_most(MAX_ROUNDS))

    @field_validator("beta", "kl_weight", "learning_rate", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_booleans(info.field_name, value)  # before pydantic would read true as 1.0

    @field_validator("beta", "kl_weight", "learning_rate")
    @classmethod
    def _searched_values(cls, value: SearchValues, info) -> SearchValues:
        """Every value a trial could get is checked here (orchestrator/config/search_values.py), not inside a trial."""
        return value if value is None else check_search_values(info.field_name, value, info.data.get("strategy"))


class ResourcesSection(Section):
    num_workers: int = Field(1, gt=0, le=MAX_WORKERS, description="Ray Train workers per trial (data-parallel ranks)" + at_most(MAX_WORKERS))
    use_gpu: bool = Field(False, description="One GPU per worker (or gpus_per_worker)")
    cpus_per_worker: float = Field(1, gt=0, le=MAX_CPUS, description="CPUs reserved per worker; also its torch thread count" + at_most(MAX_CPUS))
    gpus_per_worker: float = Field(1, ge=0, le=MAX_GPUS, description="GPUs per worker when use_gpu" + at_most(MAX_GPUS))
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a full model per worker; fsdp: shard models that do not fit one device")

    @model_validator(mode="after")
    def _gpus_a_worker_uses(self) -> "ResourcesSection":
        """A worker trains on one GPU (one rank per device): more would sit idle; a fraction of one only makes
        sense for single-worker trials sharing a GPU, since NCCL runs one rank per GPU (issue 19)."""
        gpus = self.gpus_per_worker
        if not self.use_gpu:
            return self
        if gpus == 0:
            raise ValueError("resources.gpus_per_worker: 0 with resources.use_gpu: true gives the workers no GPU; "
                             "set it to 1 (or use_gpu: false)")
        if gpus > 1:
            raise ValueError(f"resources.gpus_per_worker: {gpus:g}, but a worker trains on one GPU (one rank per GPU) and "
                             f"the others would sit idle; set it to 1 and resources.num_workers to "
                             f"{self.num_workers * math.ceil(gpus)} to use that many GPUs")
        if gpus < 1 and self.num_workers > 1:
            raise ValueError(f"resources.gpus_per_worker: {gpus:g} is a fraction of a GPU, which only single-worker "
                             f"trials may take (several share a GPU); with resources.num_workers: {self.num_workers} each "
                             "worker needs a whole GPU (one rank per GPU): set it to 1")
        return self


class FailureSection(Section):
    max_failures: int = Field(1, ge=-1, le=MAX_ROUNDS, description="Restarts of a trial's workers from their last checkpoint (-1: unlimited)" + at_most(MAX_ROUNDS))
    fail_fast: bool = Field(False, description="Stop the whole sweep when a trial fails for good (after its restarts); "
                            "false: the other trials go on")


class TrackingSection(Section):
    enabled: bool = Field(True, description="Record sweeps and trials in MLflow")
    uri: str | None = Field(None, description="MLflow tracking URI; overrides MLFLOW_TRACKING_URI; neither: the embedded local server")
    experiment: str | None = Field(None, description="MLflow experiment name (default: the config's name)")
    system_metrics: bool = Field(False, description="Log each trial's CPU, memory (and GPU) use to its MLflow run "
                                 "every 10 s, from rank 0's node (MLflow system metrics; docs/mlflow.md)")


class ExperimentConfig(Section):
    name: str = Field(description="Experiment name: the sweep name and the MLflow experiment")
    output_dir: str | None = Field(None, description="Where metrics.jsonl and checkpoints go (default outputs/<name>)")
    model: ModelSection
    data: DataSection
    dpo: DPOSection = Field(default_factory=DPOSection)
    train: TrainSection = Field(default_factory=TrainSection)
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    failure: FailureSection = Field(default_factory=FailureSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    storage_path: str = Field("./runs", description="Sweep storage: local folder, shared filesystem or s3:// URI")
    study: StudySection = Field(default_factory=StudySection, description="`dpo study`: SFT-then-DPO vs DPO-only (docs/studies.md)")
    benchmarks: list[BenchmarkEntry] = Field(default_factory=list, description="Downstream benchmark suite of `dpo study` (bench/<name> metrics)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names folders and MLflow experiments)")
        return value

    def _swept_losses(self) -> list[LossSpec]:
        """The LossSpec of each name of sweep.loss (dpo.loss with that name), each checked; [] without sweep.loss."""
        names = self.sweep.loss
        if names is None:
            return []
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sweep.loss: give a non-empty list of distinct loss names, got {names}")
        if self.sweep.strategy == "incremental_beta" and names != [self.dpo.loss]:
            raise ValueError(f"sweep.loss: the incremental procedure keeps the loss fixed per sweep (dpo.loss); "
                             f"compare losses with sweep.strategy grid, random or optuna, got {names}")
        specs = []
        for name in names:
            spec = self.dpo.loss_spec().with_names((name,))
            try:
                check_loss_spec(spec)
            except ValueError as error:
                raise ValueError(f"sweep.loss: {name!r} with the dpo.* options: {error}") from None
            if self.dpo.kl_weight > 0 and not spec.needs_reference:
                raise ValueError(f"sweep.loss: {name!r} is reference-free, but dpo.kl_weight is {self.dpo.kl_weight}: "
                                 f"set it to 0 or leave {name!r} out")
            specs.append(spec)
        return specs

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if self.dpo.kl_estimator == "exact" and self.reference.mode != "live":
            raise ValueError("dpo.kl_estimator: exact needs reference.mode: live (cached log-probs hold no full distributions)")
        loss = self.dpo.loss_spec()
        check_loss_spec(loss)  # messages name the dpo.* keys
        swept = self._swept_losses()
        if not loss.needs_reference and not any(spec.needs_reference for spec in swept):
            # Reference-free losses (simpo, sft) read no reference log-probs: no reference model, no cache.
            reason = f"dpo.loss {'+'.join(loss.names)} is reference-free: there is no reference"
            if self.dpo.kl_weight > 0:
                raise ValueError(f"dpo.kl_weight: must be 0 ({reason} to stay close to)")
            if self.dpo.kl_estimator == "exact":
                raise ValueError(f"dpo.kl_estimator: exact needs a reference ({reason}); use k2")
            self.reference.mode = "none"
        if self.reference.mode == "none" and self.dpo.kl_weight > 0:
            raise ValueError("dpo.kl_weight: must be 0 with reference.mode: none (there is no reference to stay close to)")
        if self.output_dir is None:
            self.output_dir = f"outputs/{self.name}"
        return self

    @model_validator(mode="after")
    def _trained_weights_fp32(self) -> "ExperimentConfig":
        check_weight_dtype(self.model.dtype, lora=self.model.lora is not None)  # before any work (issue 18)
        return self

    @model_validator(mode="after")
    def _study(self) -> "ExperimentConfig":
        check_study(self)  # per-arm overrides validate against the sections they override
        return self
