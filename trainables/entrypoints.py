"""What a worker runs: DPO or SFT training from plain argument groups and a `report` callable.

`run_dpo` / `run_sft` load the tokenizer and data, tokenise, get the reference log-probs (precomputed
cache, live model or none), load the policy (from a checkpoint when resuming), and run the shared loop.
The same functions serve `dpo train` in one process and every Ray Train worker of a sweep (which passes a
`prepare_model` that wraps the policy in DDP or shards it with FSDP, and a report that forwards to Ray).
Run through the CLI: `dpo train configs/quickstart.yaml`; tested by `python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from trainables.errors import UserError
from trainables.checkpointing import CheckpointError, is_sharded_checkpoint, latest_checkpoint, load_training_state
from trainables.lineage import LINEAGE_KEY, resume_lineage, run_lineage
from trainables.dpo_objective import CachedReference, DPOObjective, LiveReference, NoReference, ReferenceDistributions
from trainables.loop import Report, rank_and_world, run_training_loop
from trainables.preference_loss import build_preference_loss
from trainables.model_checks import check_model_can_train, load_prepared_tokenizer
from trainables.modeling import (attach_lora, check_trainable_dtype, enable_gradient_checkpointing, load_causal_lm,
                                 model_class_name, model_fingerprint, resolve_autocast_dtype, resolve_device,
                                 usable_attn_implementation)
from trainables.reference_cache import (ReferenceKeyInputs, ReferenceLogps, compute_reference_logps,
                                       load_or_compute_part, load_or_compute_reference_logps, reference_fingerprint)
from trainables.sharding import empty_causal_lm
from trainables.settings import DataArgs, LoopSettings, ModelArgs, PreferenceArgs, RuntimeArgs
from trainables.sft_objective import SFTObjective
from trainables.token_store import (StoredPairs, check_token_store, content_key, input_key, open_token_store, store_dir,
                                    write_token_store)
from trainables.tokenization import TokenizedPair, load_tokenized_examples, load_tokenized_pairs

logger = logging.getLogger(__name__)

@dataclass
class PreferenceData:
    """Tokenised train and eval pairs: lists, or memory-mapped StoredPairs of a token store."""

    tokenizer: Any
    train: Sequence[TokenizedPair]
    eval: Sequence[TokenizedPair]
    store: Path | None = None  # the token store that holds (or is to hold) these pairs; None: kept in memory only

    def stored(self) -> "PreferenceData":
        """These pairs read from their token store, memory-mapped, writing it first when they are still lists
        (the sweep driver, once the data is valid: trainables/token_store.py). Without a store: unchanged."""
        if self.store is None or isinstance(self.train, StoredPairs):
            return self
        if check_token_store(self.store, verify_content=True) is None:  # a hub dataset's store is found only now
            key = self.store.name.removeprefix("tokens-")
            write_token_store(self.store, {"train": self.train, "eval": self.eval}, key)
        splits = open_token_store(self.store)
        return PreferenceData(self.tokenizer, splits["train"], splits["eval"], self.store)


def _split_holdout(rows: list, holdout: int) -> tuple[list, list]:
    """Deterministically hold out `holdout` rows (a seeded permutation, independent of train.seed)."""
    if holdout <= 0:
        return rows, []
    if holdout >= len(rows):
        raise UserError(f"data.eval_holdout: {holdout} leaves no training rows out of {len(rows)}; hold out fewer rows")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1234)).tolist()
    held = set(order[:holdout])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _train_and_held_out(loader: Callable[..., list], data_args: DataArgs, tokenizer, **extra) -> tuple[list, list]:
    """Validated training rows and held-out rows (data.eval, or a deterministic hold-out)."""
    common = dict(columns=data_args.column_map, chat_template_tokenizer=tokenizer, drop_invalid=data_args.drop_invalid,
                  max_invalid_fraction=data_args.max_invalid_fraction, **extra)
    train = loader(data_args.train, split=data_args.train_split, **common)
    if data_args.eval:
        return train, loader(data_args.eval, split=data_args.eval_split, **common)
    return _split_holdout(train, data_args.eval_holdout)


def _device_and_autocast(model_args: ModelArgs, runtime_args: RuntimeArgs, seed: int) -> tuple[torch.device, torch.dtype | None]:
    """Refuses weights that would not train (16-bit without LoRA, fp16) before any work; seeds; the device and
    the autocast dtype (trained weights stay fp32 master weights, computed in bf16 under autocast)."""
    check_trainable_dtype(model_args.dtype, lora=model_args.lora_rank is not None)
    torch.manual_seed(seed)
    device = resolve_device(runtime_args.device)
    return device, resolve_autocast_dtype(runtime_args.precision, device)


def tokenizer_for(model_args: ModelArgs):
    return load_prepared_tokenizer(model_args)


def load_preference_data(model_args: ModelArgs, data_args: DataArgs, preference_args: PreferenceArgs | None = None,
                         runtime_args: RuntimeArgs | None = None, token_stores: str | None = None) -> PreferenceData:
    """Check the model (trainables/model_checks.py: also the reference and device when given), then load,
    validate and tokenise the train and eval pairs in data.num_proc processes (raises ModelError /
    InvalidDataError).

    token_stores: the folder of the sweep's token stores (StorageLayout.token_stores). A complete store of
    these inputs there is read instead (memory-mapped: no validation or tokenisation again); otherwise the
    pairs come back as lists with `store` set, and `stored()` writes them. Nothing is written here.
    """
    tokenizer = check_model_can_train(model_args, data_args, preference_args, runtime_args)
    tokenizer_path = model_args.tokenizer_path or model_args.path
    key = input_key(data_args, tokenizer, tokenizer_path) if token_stores else None
    if key is not None and check_token_store(store_dir(token_stores, key), verify_content=True) is not None:
        logger.info("data: reusing the token store %s", store_dir(token_stores, key))
        splits = open_token_store(store_dir(token_stores, key))
        return PreferenceData(tokenizer, splits["train"], splits["eval"], store_dir(token_stores, key))
    limits = dict(max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length)
    train, held_out = _train_and_held_out(load_tokenized_pairs, data_args, tokenizer, layout=data_args.layout,
                                          num_proc=data_args.num_proc, **limits)  # rows checked after tokenisation too
    if token_stores and key is None:
        key = content_key(data_args, tokenizer, tokenizer_path, train, held_out)
    return PreferenceData(tokenizer=tokenizer, train=train, eval=held_out,
                          store=store_dir(token_stores, key) if token_stores else None)


def reference_key_inputs(model_args: ModelArgs, preference_args: PreferenceArgs, runtime_args: RuntimeArgs) -> ReferenceKeyInputs:
    """What the reference log-probs depend on besides the pairs; hashes the reference's weights (once per
    sweep: the driver's reference task does it and hands the key to every trial)."""
    reference_path = preference_args.reference_path or model_args.path
    autocast_dtype = resolve_autocast_dtype(runtime_args.precision, resolve_device(runtime_args.device))
    return ReferenceKeyInputs(
        weights=model_fingerprint(reference_path, model_args.revision),
        model_class=model_class_name(reference_path),
        weight_dtype=model_args.dtype,
        compute_dtype=str(autocast_dtype or torch.float32).removeprefix("torch."),
        attn_implementation=str(usable_attn_implementation(model_args.attn_implementation, warn=False)),
    )


def reference_cache_key(model_args: ModelArgs, preference_args: PreferenceArgs, data: PreferenceData,
                        runtime_args: RuntimeArgs) -> str:
    """The reference cache's key (trainables/reference_cache.py: ReferenceKeyInputs and every pair's tokens)."""
    inputs = reference_key_inputs(model_args, preference_args, runtime_args)
    return reference_fingerprint(inputs, list(data.train) + list(data.eval))


def precompute_reference(
    model_args: ModelArgs,
    preference_args: PreferenceArgs,
    data: PreferenceData,
    runtime_args: RuntimeArgs,
    key: str | None = None,
    compute_values: Callable[[str], ReferenceLogps] | None = None,
) -> tuple[ReferenceLogps, ReferenceLogps, str, bool]:
    """Reference log-probs of train and eval pairs from the cache, computing them once if absent.

    Returns (train values, eval values, cache key, reused). Train and eval share one cache file.
    key: the cache key the sweep driver computed for these pairs (None: compute it here, hashing the weights).
    compute_values(key): every pair's values computed elsewhere on a cache miss (the sweep's data-parallel
    pass, reference_part) instead of by the model loaded here.
    """
    device = resolve_device(runtime_args.device)
    autocast_dtype = resolve_autocast_dtype(runtime_args.precision, device)
    key = key or reference_cache_key(model_args, preference_args, data, runtime_args)
    values, reused = load_or_compute_reference_logps(
        cache_dir=Path(preference_args.reference_cache_dir).expanduser(),
        fingerprint=key,
        pairs=list(data.train) + list(data.eval),
        load_reference_model=lambda: load_reference_model(model_args, preference_args, device),
        pad_token_id=data.tokenizer.pad_token_id,
        batch_size=preference_args.reference_batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        show_progress=runtime_args.show_progress,
        compute_values=None if compute_values is None else lambda: compute_values(key),
    )
    return _take(values, 0, len(data.train)), _take(values, len(data.train), len(data.eval)), key, reused


def reference_part(model_args: ModelArgs, preference_args: PreferenceArgs, data: PreferenceData,
                   runtime_args: RuntimeArgs, key: str, index: int, count: int) -> tuple[ReferenceLogps, bool]:
    """Slice `index` of `count` of the reference pass over train + eval pairs (one worker of the sweep's
    data-parallel pass): the reference model loaded here, its values written as a part file beside the cache
    (reused if a finished one is there). Returns (values, reused)."""
    device = resolve_device(runtime_args.device)
    autocast_dtype = resolve_autocast_dtype(runtime_args.precision, device)

    def compute(pairs) -> ReferenceLogps:
        model = load_reference_model(model_args, preference_args, device)
        return compute_reference_logps(model, pairs, pad_token_id=data.tokenizer.pad_token_id,
                                       batch_size=preference_args.reference_batch_size, device=device,
                                       autocast_dtype=autocast_dtype, show_progress=runtime_args.show_progress)

    return load_or_compute_part(Path(preference_args.reference_cache_dir).expanduser(), key,
                                list(data.train) + list(data.eval), index, count, compute)


def load_reference_model(model_args: ModelArgs, preference_args: PreferenceArgs, device,
                         prepare_model=None) -> torch.nn.Module:
    """The frozen reference model (reference.path, default model.path) as the policy's loading options give
    it: under FSDP (prepare_model.load_sharded) built on the meta device and sharded like the policy, no full
    copy on any rank; otherwise whole, on `device`."""
    path = preference_args.reference_path or model_args.path
    options = dict(revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                   dtype=model_args.dtype, attn_implementation=model_args.attn_implementation)
    if hasattr(prepare_model, "load_sharded"):
        return prepare_model.load_sharded(
            lambda meta: empty_causal_lm(path, **options) if meta else load_causal_lm(path, **options))
    return load_causal_lm(path, **options).to(device)


def _take(values: ReferenceLogps, start: int, count: int) -> ReferenceLogps:
    """Pairs [start, start+count) of a cache as a cache of their own."""
    chosen_lo, chosen_hi = int(values.chosen_offsets[start]), int(values.chosen_offsets[start + count])
    rejected_lo, rejected_hi = int(values.rejected_offsets[start]), int(values.rejected_offsets[start + count])
    return ReferenceLogps(
        chosen_logps=values.chosen_logps[start : start + count],
        rejected_logps=values.rejected_logps[start : start + count],
        chosen_token_logps=values.chosen_token_logps[chosen_lo:chosen_hi],
        rejected_token_logps=values.rejected_token_logps[rejected_lo:rejected_hi],
        chosen_offsets=values.chosen_offsets[start : start + count + 1] - chosen_lo,
        rejected_offsets=values.rejected_offsets[start : start + count + 1] - rejected_lo,
    )


def _resume_checkpoint(resume_from: str | None, output_dir: str, lineage: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (None: start afresh) and this run's lineage (trainables/lineage.py).

    A checkpoint of another model, tokenizer, data or stage is refused with a CheckpointError naming what differs.
    """
    checkpoint = None
    if resume_from == "latest":
        checkpoint = latest_checkpoint(Path(output_dir) / "checkpoints")
    elif resume_from is not None:
        checkpoint = Path(resume_from)
        if not (checkpoint / "training_state.pt").is_file():
            raise CheckpointError(f"train.resume_from: {resume_from!r} is not a checkpoint folder (it has no training_state.pt)")
    return checkpoint, resume_lineage(checkpoint, lineage)


def _load_policy(model_args: ModelArgs, checkpoint: Path | None, device, prepare_model, gradient_checkpointing: bool):
    """The policy: full weights from the checkpoint, or the base model plus (resumed) LoRA adapters.

    Under FSDP (a prepare_model with load_sharded, trainables/sharding.py) only rank 0 reads the weights;
    every rank builds the model on the meta device and receives its shards, so no other rank ever holds the
    full model in host memory.
    """
    lora = model_args.lora_rank is not None
    # a sharded checkpoint (torch.distributed.checkpoint) holds no HF weights: the model is built from the base model
    # and the loop loads its saved state (trainables/sharded_checkpoint.py: load_sharded_state)
    sharded = checkpoint is not None and is_sharded_checkpoint(checkpoint)
    full_checkpoint = checkpoint is not None and not lora and not sharded

    def build(meta: bool = False) -> torch.nn.Module:
        source = dict(revision=None if full_checkpoint else model_args.revision,
                      trust_remote_code=model_args.trust_remote_code, dtype=model_args.dtype,
                      attn_implementation=model_args.attn_implementation)
        path = str(checkpoint / "model") if full_checkpoint else model_args.path
        model = (empty_causal_lm(path, disable_dropout=model_args.disable_dropout, **source) if meta
                 else load_causal_lm(path, disable_dropout=model_args.disable_dropout, **source))
        if gradient_checkpointing:  # before LoRA and DDP/FSDP wrap it: it switches Hugging Face's own decoder layers
            enable_gradient_checkpointing(model)
        if lora:  # on the meta device new adapters of the same names: their values come from rank 0's
            model = attach_lora(model, rank=model_args.lora_rank, alpha=model_args.lora_alpha,
                                dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
                                adapter_dir=str(checkpoint / "model") if checkpoint and not meta and not sharded else None)
        return model

    if hasattr(prepare_model, "load_sharded"):
        return prepare_model.load_sharded(build)
    model = build()
    return prepare_model(model) if prepare_model else model.to(device)


def _reference_for(model_args, preference_args, data, runtime_args, device, autocast_dtype, policy, reference_key=None,
                   prepare_model=None):
    if preference_args.reference_mode == "none" or not preference_args.loss.needs_reference:
        return NoReference(), None
    exact = preference_args.kl_estimator == "exact"
    if policy is not None:  # LoRA with a live reference: the policy with its adapters disabled
        return LiveReference(policy, exact, autocast_dtype, adapters_of_policy=True,
                             padding_buckets=runtime_args.padding_buckets, share_prompt=runtime_args.share_prompt,
                             pad_token_id=data.tokenizer.pad_token_id), None
    if preference_args.reference_mode == "live":
        model = load_reference_model(model_args, preference_args, device, prepare_model)
        return LiveReference(model, exact, autocast_dtype, padding_buckets=runtime_args.padding_buckets,
                             share_prompt=runtime_args.share_prompt, pad_token_id=data.tokenizer.pad_token_id), None
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 fills the cache first; the others then read it
    train_values, eval_values, key, _ = precompute_reference(model_args, preference_args, data, runtime_args,
                                                             key=reference_key)
    if world > 1 and rank == 0:
        dist.barrier()
    return CachedReference(train_values, eval_values), key


def _reference_distributions(model_args, preference_args, data, runtime_args, device, autocast_dtype, reference,
                             policy, prepare_model=None) -> ReferenceDistributions | None:
    """Where the exact eval/kl gets the reference's full distributions: the live reference (a second view
    that keeps logits, no second model), the LoRA policy with its adapters off, or, with precomputed
    log-probs, the reference model loaded at the first evaluation. None without a reference or eval pairs."""
    if isinstance(reference, NoReference) or not data.eval:
        return None
    options = dict(padding_buckets=runtime_args.padding_buckets, share_prompt=False,
                   pad_token_id=data.tokenizer.pad_token_id)
    if isinstance(reference, LiveReference):
        view = LiveReference(reference.model, True, autocast_dtype, adapters_of_policy=reference.adapters_of_policy,
                             **options)
        return ReferenceDistributions(lambda: view)
    if model_args.lora_rank is not None and not preference_args.reference_path:
        return ReferenceDistributions(lambda: LiveReference(policy, True, autocast_dtype, adapters_of_policy=True,
                                                            **options))

    def load() -> LiveReference:
        logger.info("eval/kl: loading the reference model for the exact KL at evaluation")
        # under FSDP sharded like the policy: every rank evaluates in step, so the load's collectives match
        model = load_reference_model(model_args, preference_args, device, prepare_model)
        return LiveReference(model, True, autocast_dtype, **options)

    return ReferenceDistributions(load)


def run_dpo(
    model_args: ModelArgs,
    data_args: DataArgs,
    preference_args: PreferenceArgs,
    loop_settings: LoopSettings,
    runtime_args: RuntimeArgs,
    report: Report,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    data: PreferenceData | None = None,
    reference_key: str | None = None,
) -> dict[str, float]:
    """Train a policy with DPO; returns the last reported metrics.

    data: the pairs of data_args already loaded and tokenised (a sweep driver's, shared through Ray's
    object store); read from data_args when None.
    reference_key: the reference cache key of `data`, computed once by the sweep driver (None: computed
    here; a sweep's trials and ranks never re-hash the weights).
    """
    device, autocast_dtype = _device_and_autocast(model_args, runtime_args, loop_settings.seed)
    data = data if data is not None else load_preference_data(model_args, data_args, preference_args, runtime_args)
    reference_path = None if preference_args.reference_mode == "none" else preference_args.reference_path or model_args.path
    checkpoint, lineage = _resume_checkpoint(runtime_args.resume_from, loop_settings.output_dir, run_lineage(
        stage="dpo", model_args=model_args, tokenizer=data.tokenizer, train=data.train, eval=data.eval,
        reference_path=reference_path))
    reference_is_policy = (preference_args.reference_mode == "live" and model_args.lora_rank is not None
                           and not preference_args.reference_path)
    model = (_load_policy(model_args, checkpoint, device, prepare_model, runtime_args.gradient_checkpointing)
             if reference_is_policy else None)
    # Otherwise the reference goes first, so a cache miss never holds two models in memory at once.
    reference, cache_key = _reference_for(model_args, preference_args, data, runtime_args, device, autocast_dtype, model,
                                          reference_key, prepare_model)
    model = model or _load_policy(model_args, checkpoint, device, prepare_model, runtime_args.gradient_checkpointing)
    objective = DPOObjective(
        train_pairs=data.train, eval_pairs=data.eval, reference=reference,
        loss=build_preference_loss(preference_args.loss),
        beta=preference_args.beta, kl_weight=preference_args.kl_weight,
        exact_kl=preference_args.kl_estimator == "exact" and preference_args.reference_mode == "live",
        pad_token_id=data.tokenizer.pad_token_id,
        device=device, autocast_dtype=autocast_dtype, eval_batch_size=runtime_args.eval_batch_size,
        padding_buckets=runtime_args.padding_buckets, share_prompt=runtime_args.share_prompt,
        reference_distributions=_reference_distributions(model_args, preference_args, data, runtime_args, device,
                                                         autocast_dtype, reference, model, prepare_model),
    )
    extra = {"stage": "dpo", "base_model": model_args.path, "beta": preference_args.beta,
             "kl_weight": preference_args.kl_weight, "reference_cache_key": cache_key or "", LINEAGE_KEY: lineage}
    return run_training_loop(
        model=model, tokenizer=data.tokenizer, objective=objective, settings=loop_settings, report=report,
        device=device, resume_state=load_training_state(checkpoint) if checkpoint else None, checkpoint_extra=extra,
    )


def load_sft_data(model_args: ModelArgs, data_args: DataArgs, runtime_args: RuntimeArgs | None = None):
    """(tokenizer, train, held-out) SFT examples, checked and tokenised as `dpo sft` trains on them."""
    tokenizer = check_model_can_train(model_args, data_args, None, runtime_args)
    limits = dict(max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length)
    train, held_out = _train_and_held_out(load_tokenized_examples, data_args, tokenizer, **limits)
    return tokenizer, train, held_out


def run_sft(
    model_args: ModelArgs,
    data_args: DataArgs,
    loop_settings: LoopSettings,
    runtime_args: RuntimeArgs,
    report: Report,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> dict[str, float]:
    """Supervised fine-tuning on prompt/completion examples; returns the last reported metrics."""
    device, autocast_dtype = _device_and_autocast(model_args, runtime_args, loop_settings.seed)
    tokenizer, train, held_out = load_sft_data(model_args, data_args, runtime_args)
    checkpoint, lineage = _resume_checkpoint(runtime_args.resume_from, loop_settings.output_dir, run_lineage(
        stage="sft", model_args=model_args, tokenizer=tokenizer, train=train, eval=held_out))
    model = _load_policy(model_args, checkpoint, device, prepare_model, runtime_args.gradient_checkpointing)
    objective = SFTObjective(
        train_examples=train, eval_examples=held_out, pad_token_id=tokenizer.pad_token_id,
        device=device, autocast_dtype=autocast_dtype, eval_batch_size=runtime_args.eval_batch_size,
        padding_buckets=runtime_args.padding_buckets,
    )
    return run_training_loop(
        model=model, tokenizer=tokenizer, objective=objective, settings=loop_settings, report=report,
        device=device, resume_state=load_training_state(checkpoint) if checkpoint else None,
        checkpoint_extra={"stage": "sft", "base_model": model_args.path, LINEAGE_KEY: lineage},
    )
