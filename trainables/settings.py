"""Plain, frozen argument groups that the driver hands to the engine (never the config object).

The driver validates the YAML config once, at the CLI edge, and resolves it into a run spec
(orchestrator/config/spec.py) made of these groups. Everything under trainables/ takes them as plain
values: no defaults live here (the config's are the only ones), so the engine runs and is tested
without Ray or the config layer, and a value can never silently differ between the two. Importing this
module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.loss_options import LossSpec


@dataclass(frozen=True)
class ModelArgs:
    """Which causal LM to train and how to load it."""

    path: str  # local directory written by save_pretrained, or a hub name
    tokenizer_path: str | None  # None: the model's path
    revision: str | None  # hub revision
    trust_remote_code: bool  # run code shipped with the model: only when asked
    dtype: str  # weight dtype: float32 | bfloat16 | float16
    attn_implementation: str | None  # sdpa | eager | flash_attention_2
    disable_dropout: bool  # so step 0 of DPO starts exactly at ln 2
    lora_rank: int | None  # None: train all weights; else LoRA adapters of this rank (peft)
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: str | tuple[str, ...]


@dataclass(frozen=True)
class DataArgs:
    """Where the pairs (or SFT examples) come from and how they are tokenised."""

    train: str  # file path or hub dataset name
    eval: str | None  # held-out file; None = no held-out evaluation unless eval_holdout > 0
    train_split: str
    eval_split: str
    layout: str  # auto | explicit | conversational | implicit_prompt
    columns: tuple[tuple[str, str], ...]  # (canonical name, column in the file) pairs
    max_length: int
    max_prompt_length: int | None
    drop_invalid: bool
    max_invalid_fraction: float
    eval_holdout: int  # when eval is None: hold out this many training rows (deterministic)
    num_proc: int | None  # processes that validate and tokenise (None: auto, trainables/data.resolve_num_proc)

    @property
    def column_map(self) -> dict[str, str] | None:
        return dict(self.columns) or None


@dataclass(frozen=True)
class PreferenceArgs:
    """The DPO objective and its reference model."""

    beta: float
    kl_weight: float  # lambda: weight of the explicit KL(pi || pi_ref) term
    loss: LossSpec  # the preference loss: names, weights and options (trainables/loss_options.py)
    kl_estimator: str  # the penalty's: k2 (works with cached log-probs) | exact (full vocabulary, live reference)
    reference_mode: str  # precomputed | live | none (none: also whenever the loss is reference-free)
    reference_path: str | None  # None: the policy's model path
    reference_cache_dir: str  # where precomputed log-probs are cached
    reference_batch_size: int


@dataclass(frozen=True)
class RuntimeArgs:
    """Where and how the worker runs."""

    device: str  # auto | cpu | cuda | cuda:N
    precision: str  # auto (bf16 autocast on CUDA) | fp32 | bf16; trained weights stay fp32 either way
    gradient_checkpointing: bool  # recompute decoder layers in backward (non-reentrant) instead of keeping activations
    eval_batch_size: int
    padding_buckets: int | str  # forwards per micro-batch by row length: "auto" | K >= 1 (1 = one padded batch)
    share_prompt: bool | str  # one row per pair, prompt computed once: "auto" (if a probe agrees) | True | False
    resume_from: str | None  # a checkpoint folder, "latest" (under output_dir), or None
    show_progress: bool


@dataclass(frozen=True)
class LoopSettings:
    """The optimisation loop's settings (trainables/loop.py)."""

    learning_rate: float
    batch_size: int  # pairs (or examples) per optimizer step, over all workers
    micro_batch_size: int  # per worker per forward/backward
    max_steps: int
    warmup_steps: int
    schedule: str  # cosine | linear | constant
    weight_decay: float
    max_grad_norm: float | None
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int | None
    log_every: int
    seed: int
    output_dir: str
    show_progress: bool


# The values two runtime options may take; the config validates with these, the engine relies on them.

def check_padding_buckets(value: object) -> int | str:
    """Return `value` if it is "auto" or an int >= 1 (not a bool); else a ValueError saying what is allowed."""
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError('must be "auto" or an integer >= 1 (1 = one forward per micro-batch, as before bucketing)')


def check_share_prompt(value: object) -> bool | str:
    """Return `value` if it is "auto", True or False; else a ValueError saying what is allowed."""
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError('must be "auto" (shared-prompt forward when a probe agrees), true (required) or false (never)')
