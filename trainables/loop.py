"""The optimisation loop shared by DPO and SFT: steps, accumulation, clipping, eval, checkpoints.

What differs between DPO and SFT lives in an `Objective` (dpo_objective.py, sft_objective.py); this
loop owns AdamW with a warmup + decay schedule, gradient accumulation, gradient clipping, the
deterministic data order (a seeded permutation per epoch, so the data position is just the step),
metric windows, evaluation every `eval_every` steps and at the end, atomic checkpoints, resume, and
the stop on a non-finite loss, and the stop with a checkpoint that SIGTERM / SIGINT ask for under
`dpo train` or in any worker of a trial, at a step boundary every rank agrees on (trainables/preemption.py). It never imports Ray: progress leaves through `report(metrics,
checkpoint_dir)`. Under torch.distributed (DDP, or FSDP via trainables/sharding.py) each rank takes a
strided share of every global batch and metric sums are all-reduced, so W workers give the losses of 1
worker with the same global batch.
Tested by `python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from trainables.settings import LoopSettings
from trainables.checkpointing import restore_rng_state, save_checkpoint
from trainables.sharded_checkpoint import load_sharded_state, save_sharded_checkpoint
from trainables.preemption import Preempted, stop_requested
from trainables.sharding import clip_gradients, gather_full_state, gradient_sync, is_sharded, load_optimizer_state

logger = logging.getLogger(__name__)

Report = Callable[[dict[str, Any], "str | None"], None]
METRIC_WINDOW_KEY = "metric_window"  # checkpoint extra: the train/ metric sums since the last logged step
OBJECTIVE_STATE_KEY = "objective"  # checkpoint extra: the objective's running state (DPOObjective.state_dict)


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step when a loss is NaN or inf; no checkpoint follows it."""


class Objective(Protocol):
    """A training objective: computes a micro-batch loss and metric sums, and evaluates."""

    dataset_size: int

    def token_count(self, indices: Sequence[int]) -> int: ...

    def micro_batch(
        self, model: torch.nn.Module, indices: Sequence[int], global_batch_size: int, global_token_count: int
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summarize(self, sums: dict[str, float], prefix: str) -> dict[str, float]: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over all ranks (identity without torch.distributed)."""
    _, world = rank_and_world()
    if world == 1:
        return dict(sums)
    keys = sorted(sums)
    packed = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def agreed_stop_signal(device: torch.device) -> str | None:
    """The stop signal any rank received (trainables/preemption.py), or None; the same answer on every rank.

    Several ranks must stop at the same step boundary: each saves its part of the checkpoint of that step (or
    waits at the barrier for rank 0's) and reports it, so a SIGTERM that reaches one worker of a trial stops the
    whole group there. One integer all-reduce (MAX of the signal numbers) per step; nothing without
    torch.distributed.
    """
    name = stop_requested()
    _, world = rank_and_world()
    if world == 1:
        return name
    number = torch.tensor([int(signal.Signals[name]) if name else 0], dtype=torch.int64, device=device)
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    agreed = int(number.item())
    return signal.Signals(agreed).name if agreed else None


def global_batch_indices(step: int, dataset_size: int, batch_size: int, seed: int) -> list[int]:
    """Indices of optimizer step `step` (0-based): consecutive slices of per-epoch seeded permutations."""
    start = step * batch_size
    indices: list[int] = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), dataset_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(dataset_size, generator=generator).tolist()
        indices.extend(permutation[offset : offset + batch_size - len(indices)])
    return indices


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay.

    The fused kernel (one pass over all parameters; CPU and CUDA) when every trainable parameter is a
    floating-point tensor on one CPU or CUDA device; torch's default multi-tensor version otherwise (e.g.
    parameters spread over devices, or FSDP's DTensors on older torch). Both implement the same update.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    devices = {p.device for p in trainable}
    fused = (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
             and all(p.is_floating_point() and type(p.data) is torch.Tensor for p in trainable))
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine or linear decay to 0 at max_steps (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_training_loop(
    *,
    model: torch.nn.Module,
    tokenizer,
    objective: Objective,
    settings: LoopSettings,
    report: Report,
    device: torch.device,
    resume_state: dict[str, Any] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train for settings.max_steps optimizer steps; returns the last reported metrics."""
    rank, world = rank_and_world()  # batch_size % world == 0: checked when the run spec is resolved
    optimizer = build_optimizer(model, settings.learning_rate, settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(step, settings.warmup_steps, settings.max_steps, settings.schedule),
    )
    start_step = 0
    if resume_state is not None:
        if resume_state.get("sharded_checkpoint"):  # torch.distributed.checkpoint: model and optimizer, any world size
            load_sharded_state(resume_state["sharded_checkpoint"], model, optimizer)
        else:
            load_optimizer_state(model, optimizer, resume_state["optimizer"])  # full state; sharded under FSDP
        scheduler.load_state_dict(resume_state["scheduler"])
        restore_rng_state(resume_state["rng"])
        start_step = int(resume_state["step"])
        if hasattr(objective, "load_state_dict"):  # the loss's running state (bco_pair's reward mean)
            objective.load_state_dict(resume_state.get("extra", {}).get(OBJECTIVE_STATE_KEY))
        logger.info("resumed at step %d (%d pairs consumed)", start_step, resume_state["pairs_consumed"])
    checkpoints_dir = Path(settings.output_dir) / "checkpoints"
    # The metric window in progress is part of a checkpoint, so a resumed run reports the same window means.
    saved_window = (resume_state or {}).get("extra", {}).get(METRIC_WINDOW_KEY) or {}
    # "totals": the window summed over the saving world's ranks, split evenly over this world's ranks, so a run
    # resumed on fewer or more ranks reports the same means; "sums" (older checkpoints): already split, same world
    window: dict[str, float] = ({key: value / world for key, value in saved_window["totals"].items()}
                                if "totals" in saved_window else dict(saved_window.get("sums", {})))
    window_seconds = float(saved_window.get("seconds", 0.0))
    step_seconds_total = 0.0  # time inside optimizer steps, for overhead accounting (bench/sweep.py)
    eval_seconds_total = 0.0
    last_metrics: dict[str, float] = {}
    progress = tqdm(
        total=settings.max_steps, initial=start_step, desc="train", disable=not settings.show_progress or rank != 0
    )
    model.train()
    for step in range(start_step, settings.max_steps):
        started = time.perf_counter()
        batch = global_batch_indices(step, objective.dataset_size, settings.batch_size, settings.seed)
        global_tokens = objective.token_count(batch)
        local = batch[rank::world]
        optimizer.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {}
        for start in range(0, len(local), settings.micro_batch_size):
            micro = local[start : start + settings.micro_batch_size]
            final = start + settings.micro_batch_size >= len(local)
            with gradient_sync(model, final):  # one gradient reduction per step, in the last micro-batch's backward
                loss, sums = objective.micro_batch(model, micro, settings.batch_size, global_tokens)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {step + 1}; stopping without a checkpoint. "
                        "Lower train.learning_rate or dpo.beta, or check the data for degenerate pairs."
                    )
                (loss * world).backward()  # DDP and FSDP average gradients over ranks; undo that: the global mean
            for key, value in sums.items():
                step_sums[key] = step_sums.get(key, 0.0) + value
        grad_norm = clip_gradients(model, settings.max_grad_norm)  # the global norm, also under FSDP
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm at step {step + 1}; stopping without a checkpoint.")
        step_sums["grad_norm"] = float(grad_norm) / world  # identical on every rank; summed back to one value
        step_sums["lr"] = scheduler.get_last_lr()[0] / world
        step_sums["steps"] = 1.0 / world
        optimizer.step()
        scheduler.step()
        window_seconds += time.perf_counter() - started
        step_seconds_total += time.perf_counter() - started
        for key, value in step_sums.items():
            window[key] = window.get(key, 0.0) + value
        done = step + 1
        progress.update(1)
        metrics: dict[str, float] = {}
        if done == 1 or done % settings.log_every == 0 or done == settings.max_steps:
            reduced = all_reduce_sums(window, device)
            metrics.update(objective.summarize(reduced, "train"))
            steps = reduced.pop("steps")
            metrics["train/grad_norm"] = reduced["grad_norm"] / steps
            metrics["train/lr"] = reduced["lr"] / steps
            metrics["train/tokens_per_second"] = reduced.get("tokens", 0.0) / max(window_seconds, 1e-9) / world
            window, window_seconds = {}, 0.0
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        if done % settings.eval_every == 0 or done == settings.max_steps:
            eval_started = time.perf_counter()
            model.eval()
            metrics.update(objective.evaluate(model))
            model.train()
            eval_seconds_total += time.perf_counter() - eval_started
        checkpoint_dir = None
        # SIGTERM / SIGINT under `dpo train` or to any worker of a Ray trial (trainables/preemption.py)
        stop_signal = agreed_stop_signal(device)
        checkpoint_step = done % settings.checkpoint_every == 0 or done == settings.max_steps or stop_signal is not None
        if checkpoint_step:
            # the window's sums over all ranks: a resumed run splits them over its own ranks, whatever their number
            window_state = {"totals": all_reduce_sums(window, device),
                            "seconds": window_seconds}
            extra = {**(checkpoint_extra or {}), METRIC_WINDOW_KEY: window_state,
                     **({OBJECTIVE_STATE_KEY: objective.state_dict()} if hasattr(objective, "state_dict") else {})}
            if world > 1 and is_sharded(model):  # FSDP: each rank writes its own shards (no full gather)
                saved = save_sharded_checkpoint(
                    checkpoints_dir, done, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                    pairs_consumed=done * settings.batch_size, extra=extra, keep_last=settings.keep_checkpoints)
                checkpoint_dir = str(saved) if rank == 0 else None
            else:
                # FSDP on one rank: its full state on rank 0; (None, None) for a plain or DDP model
                model_state, optimizer_state = gather_full_state(model, optimizer)
                if rank == 0:
                    checkpoint_dir = str(save_checkpoint(
                        checkpoints_dir, done, model=model, tokenizer=tokenizer, optimizer=optimizer,
                        model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler,
                        pairs_consumed=done * settings.batch_size, extra=extra, keep_last=settings.keep_checkpoints))
            if world > 1:
                dist.barrier()
        if metrics or checkpoint_step:  # the same decision on every rank: Ray needs all ranks to report
            metrics["step"] = done
            metrics["perf/step_seconds_total"] = step_seconds_total
            metrics["perf/eval_seconds_total"] = eval_seconds_total
            report(metrics, checkpoint_dir)
            last_metrics.update(metrics)
        if stop_signal is not None and done < settings.max_steps:
            progress.close()
            if world > 1:  # every rank's report of this step, rank 0's checkpoint included, is out before any rank
                dist.barrier()  # ends: Ray Train would otherwise see an error before the checkpoint it must resume from
            raise Preempted(stop_signal, done, settings.max_steps, checkpoint_dir)
    progress.close()
    return last_metrics
