"""Plain, frozen argument groups that the orchestrator hands to a worker (never the config object).

The orchestrator validates the YAML config (orchestrator/config.py) and resolves it into these groups;
everything under trainables/ takes them as plain values, so the engine runs and is tested without Ray
or the config layer. Used by trainables/entrypoints.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelArgs:
    """Which causal LM to train and how to load it."""

    path: str  # local directory written by save_pretrained, or a hub name
    tokenizer_path: str | None = None  # defaults to path
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False  # run code shipped with the model: only when asked
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 | float16
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2
    disable_dropout: bool = True  # so step 0 of DPO starts exactly at ln 2
    lora_rank: int | None = None  # None: train all weights; else LoRA adapters of this rank (peft)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class DataArgs:
    """Where the pairs (or SFT examples) come from and how they are tokenised."""

    train: str  # file path or hub dataset name
    eval: str | None = None  # held-out file; None = no held-out evaluation unless eval_holdout > 0
    train_split: str = "train"
    eval_split: str = "test"
    layout: str = "auto"  # auto | explicit | conversational | implicit_prompt
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column in the file
    max_length: int = 512
    max_prompt_length: int | None = None
    drop_invalid: bool = False
    max_invalid_fraction: float = 0.05
    eval_holdout: int = 0  # when eval is None: hold out this many training rows (deterministic)


@dataclass(frozen=True)
class PreferenceArgs:
    """The DPO objective and its reference model."""

    beta: float = 0.1
    kl_weight: float = 0.0  # lambda of the notes: weight of the explicit KL(pi || pi_ref) term
    loss: str = "sigmoid"  # sigmoid | ipo | cdpo | hinge
    label_smoothing: float = 0.0  # cdpo only
    kl_estimator: str = "k3"  # k3 (works with cached log-probs) | exact (full vocabulary, live reference)
    reference_mode: str = "precomputed"  # precomputed | live | none
    reference_path: str | None = None  # defaults to the policy's model path
    reference_cache_dir: str | None = None  # where precomputed log-probs are cached
    reference_batch_size: int = 32


@dataclass(frozen=True)
class RuntimeArgs:
    """Where and how the worker runs."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | fp32 | bf16
    eval_batch_size: int = 32
    padding_buckets: int | str = "auto"  # forwards per micro-batch by row length: "auto" | K >= 1 (1 = one padded batch)
    share_prompt: bool | str = "auto"  # one row per pair, prompt computed once: "auto" (if a probe agrees) | True | False
    resume_from: str | None = None  # a checkpoint folder, "latest" (under output_dir), or None
    show_progress: bool = True
