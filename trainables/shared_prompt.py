"""Shared-prompt forward: each pair's prompt goes through the model once, for chosen and rejected together.

The standard layout (tokenization.collate_pairs) runs 2B rows, prompt+chosen and prompt+rejected, so every
prompt token is computed twice. Here each pair is ONE row, [prompt | chosen | rejected | pad], with

    position ids   0..P-1 (prompt), P..P+C-1 (chosen), P..P+R-1 (rejected, the same positions again), 0 (pad)
    attention      causal, never to padding, and rejected tokens never see chosen tokens

given to the model as a 4D additive float mask (B, 1, L, L): 0 where allowed, finfo(dtype).min elsewhere
(HF eager attention adds it; SDPA takes it as is; transformers passes a 4D mask through unchanged). So every
chosen and rejected token sees exactly the tokens, at exactly the positions, it sees in the standard layout.
Predictors: chosen token k <- output at P-1+k; rejected token 0 <- output at P-1 (the last PROMPT token),
rejected token k > 0 <- output at P+C+k-1. Only those outputs are gathered and log-softmaxed (in chunks,
logprobs.target_logps), and the result is put back into the standard layout: token_logps (2B, seq) aligned
with collate_pairs' answer_mask, rows [0:B] chosen and [B:2B] rejected, so losses, the k3 KL against cached
reference log-probs, metrics and the one backward are unchanged. Exact KL (full-vocabulary logits) is not
served here: callers fall back to logprobs.forward_logps. With padding_buckets other than 1 the buckets
are planned over the shared rows' lengths (P+C+R) and each bucket is one forward cut to its longest row.

Not every model honours a custom 4D mask (flash-attention / flex kernels, remote code that rebuilds its own
mask or positions), so `decide_share_prompt` checks the attention implementation and probes the first
micro-batch against the standard forward before using it ("auto"), identically on every rank.
Tested by `python -m pytest tests/test_shared_prompt.py -q`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence, Union

import torch
import torch.distributed as dist

from trainables.bucketing import PaddingBuckets, plan_buckets
from trainables.answer_head import answer_logps
from trainables.logprobs import ForwardLogps, forward_logps
from trainables.tokenization import TokenizedPair

logger = logging.getLogger(__name__)

SharePrompt = Union[bool, str]  # "auto" | True | False
MASK_HONOURING_ATTENTION = ("eager", "sdpa")  # implementations that apply a given 4D additive mask as is
# auto: the shared rows must save at least this share of the padded tokens of the standard layout; below
# it the longer rows' attention (quadratic in P+C+R) and the custom mask can cost more than they save.
MIN_TOKEN_SAVING = 0.10
PROBE_TOLERANCE_FP32 = 1e-4  # max |token log-prob difference|, shared vs standard, without autocast
PROBE_TOLERANCE_AUTOCAST = 5e-2  # the same under bf16/fp16 autocast (different reduction orders round apart)


@dataclass
class SharedBatch:
    """One row per pair, [prompt | chosen | rejected | pad], and where each answer token's predictor sits."""

    input_ids: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L) long
    allowed: torch.Tensor  # (B, L, L) bool, query x key
    predictor: torch.Tensor  # (N,) long: flat index into B*L of the output predicting each answer token
    targets: torch.Tensor  # (N,) long: the answer token ids; chosen tokens of every pair, then rejected ones


def collate_shared(pairs: Sequence[TokenizedPair], pad_token_id: int) -> SharedBatch:
    """The shared layout of `pairs`; answer tokens ordered as collate_pairs' answer_mask, row-major."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    if any(len(pair.prompt_ids) == 0 for pair in pairs):
        raise ValueError("every pair needs at least one prompt token (the first answer tokens are predicted from it)")
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    width = max(lengths)
    input_ids = torch.tensor([list(p.prompt_ids + p.chosen_ids + p.rejected_ids) + [pad_token_id] * (width - n)
                              for p, n in zip(pairs, lengths)], dtype=torch.long)  # (B, L)
    prompt = torch.tensor([len(p.prompt_ids) for p in pairs]).unsqueeze(1)  # (B, 1)
    chosen_end = prompt + torch.tensor([len(p.chosen_ids) for p in pairs]).unsqueeze(1)  # (B, 1)
    end = torch.tensor(lengths).unsqueeze(1)  # (B, 1)
    column = torch.arange(width).unsqueeze(0)  # (1, L)
    is_rejected = (column >= chosen_end) & (column < end)  # (B, L)
    is_chosen = (column >= prompt) & (column < chosen_end)  # (B, L)
    is_real = column < end  # (B, L)
    position_ids = torch.where(is_rejected, column - (chosen_end - prompt), column) * is_real  # (B, L), pads at 0
    causal = column.unsqueeze(2) >= column.unsqueeze(1)  # (1, L, L) query i, key j: j <= i
    allowed = causal & is_real.unsqueeze(1) & is_real.unsqueeze(2)  # (B, L, L)
    allowed &= ~(is_rejected.unsqueeze(2) & is_chosen.unsqueeze(1))  # rejected queries never see chosen keys
    allowed |= torch.eye(width, dtype=torch.bool).unsqueeze(0) & ~is_real.unsqueeze(2)  # pads see themselves only
    chosen_predictors, rejected_predictors, chosen_targets, rejected_targets = [], [], [], []
    for row, pair in enumerate(pairs):
        base, p, c, r = row * width, len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        chosen_predictors.extend(base + p - 1 + k for k in range(c))
        rejected_predictors.extend(base + (p - 1 if k == 0 else p + c + k - 1) for k in range(r))
        chosen_targets.extend(pair.chosen_ids)
        rejected_targets.extend(pair.rejected_ids)
    return SharedBatch(input_ids=input_ids, position_ids=position_ids, allowed=allowed,
                       predictor=torch.tensor(chosen_predictors + rejected_predictors, dtype=torch.long),
                       targets=torch.tensor(chosen_targets + rejected_targets, dtype=torch.long))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool -> (B, 1, L, L) float: 0 where allowed, finfo(dtype).min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # (B, L, L)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)  # (B, 1, L, L)


def _compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def _answer_logps_once(model: torch.nn.Module, shared: SharedBatch, device: torch.device) -> torch.Tensor:
    """Log-probs (N,) float32 of the batch's answer tokens, in SharedBatch.targets order."""
    input_ids = shared.input_ids.to(device)  # (B, L)
    mask = additive_mask(shared.allowed.to(device), _compute_dtype(model, device))  # (B, 1, L, L)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": shared.position_ids.to(device)}
    return answer_logps(model, inputs, shared.predictor.to(device), shared.targets.to(device))  # (N,), no logits kept


def shared_forward_logps(model: torch.nn.Module, pairs: Sequence[TokenizedPair], answer_mask: torch.Tensor,
                         pad_token_id: int, padding_buckets: PaddingBuckets = 1) -> ForwardLogps:
    """The pairs' answer-token log-probs from shared-prompt forwards, in logprobs.forward_logps' layout.

    answer_mask: (2B, seq) bool from collate_pairs(pairs); its device is where the model runs. Returns
    token_logps (2B, seq) float32 (zero off the mask), sequence_logps (2B,), logits None.
    """
    device = answer_mask.device
    chosen = [len(p.chosen_ids) for p in pairs]
    rejected = [len(p.rejected_ids) for p in pairs]
    chosen_start = list(accumulate(chosen, initial=0))  # where pair b's chosen tokens start in the N order
    rejected_start = list(accumulate(rejected, initial=sum(chosen)))
    lengths = [len(p.prompt_ids) + c + r for p, c, r in zip(pairs, chosen, rejected)]
    buckets = plan_buckets(lengths, padding_buckets)  # rows sorted by length within and across buckets
    if len(buckets) == 1:
        buckets = [list(range(len(pairs)))]  # one forward: keep the pairs' order, no permutation needed
    values, destinations = [], []
    for rows in buckets:
        values.append(_answer_logps_once(model, collate_shared([pairs[b] for b in rows], pad_token_id), device))
        destinations.extend([i for b in rows for i in range(chosen_start[b], chosen_start[b] + chosen[b])]
                            + [i for b in rows for i in range(rejected_start[b], rejected_start[b] + rejected[b])])
    flat = torch.cat(values)  # (N,) in bucket order
    if destinations != list(range(len(destinations))):  # plan_buckets sorts rows by length, even into one bucket
        inverse = torch.empty(len(destinations), dtype=torch.long)
        inverse[torch.tensor(destinations)] = torch.arange(len(destinations))  # answer-mask order -> bucket order
        flat = flat[inverse.to(device)]  # (N,) in answer-mask order
    if flat.numel() != int(answer_mask.sum()):
        raise ValueError(f"answer_mask holds {int(answer_mask.sum())} answer tokens, the pairs {flat.numel()}: "
                         "pass the answer_mask of collate_pairs(pairs)")
    token_logps = torch.zeros(answer_mask.shape, dtype=torch.float32, device=device)  # (2B, seq)
    token_logps = token_logps.masked_scatter(answer_mask, flat)  # row-major, as collate_pairs lays answers out
    return ForwardLogps(token_logps=token_logps, sequence_logps=token_logps.sum(-1), logits=None)


def attention_implementation(model: torch.nn.Module) -> str | None:
    """config._attn_implementation of a (DDP/FSDP/PEFT-wrapped) HF model, None when it has none."""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)


def decide_share_prompt(model: torch.nn.Module, share_prompt: SharePrompt, pairs: Sequence[TokenizedPair],
                        batch: dict[str, torch.Tensor], pad_token_id: int, who: str) -> bool:
    """Whether `model` may use the shared-prompt forward: False when asked not to; otherwise the attention
    implementation must honour a 4D mask and a no-grad, eval-mode probe on `batch` (collate_pairs(pairs), on
    the model's device, under the caller's autocast) must agree with the standard forward. Every rank decides
    alike: the probe's difference is all-reduced (max). share_prompt=True turns a refusal into a ValueError."""
    if share_prompt is False:
        return False
    implementation = attention_implementation(model)
    if implementation not in MASK_HONOURING_ATTENTION:
        reason = (f"attention implementation {implementation!r} does not take a custom 4D mask "
                  f"(only {' / '.join(MASK_HONOURING_ATTENTION)} do)")
        return _refuse(share_prompt, who, reason)
    was_training = model.training
    model.eval()  # dropout (when left on) would make the two layouts differ for a reason that is not the mask
    try:
        with torch.no_grad():
            standard = forward_logps(model, batch).token_logps  # (2B, seq)
            shared = shared_forward_logps(model, pairs, batch["answer_mask"], pad_token_id).token_logps  # (2B, seq)
    finally:
        model.train(was_training)
    difference = (standard - shared).abs().max().detach().reshape(1).double()  # (1,)
    if not torch.isfinite(difference).all():
        difference.fill_(float("inf"))
    longest_shared = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    kept = torch.tensor([len(pairs) * longest_shared / batch["input_ids"].numel()], dtype=torch.float64,
                        device=difference.device)  # (1,) padded tokens, shared / standard layout
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)  # the same decision on every rank
        dist.all_reduce(kept, op=dist.ReduceOp.MAX)
    if share_prompt == "auto" and kept.item() > 1 - MIN_TOKEN_SAVING:
        return _refuse(share_prompt, who, f"on the first micro-batch one row per pair would keep {kept.item():.0%} of the "
                                          f"padded tokens (prompts short against the answers): it does not pay")
    device_type = batch["input_ids"].device.type
    tolerance = PROBE_TOLERANCE_AUTOCAST if torch.is_autocast_enabled(device_type) else PROBE_TOLERANCE_FP32
    if difference.item() > tolerance:
        return _refuse(share_prompt, who, f"probe on the first micro-batch: shared vs standard token log-probs differ "
                                          f"by up to {difference.item():.3g} > {tolerance:g}")
    logger.info("%s: shared-prompt forward on (probe: max token log-prob difference %.2g <= %g, attention %s)",
                who, difference.item(), tolerance, implementation)
    return True


class PairForward:
    """Answer-token log-probs of collated pairs for one model (the policy, or a live reference): by the
    shared-prompt forward when `share_prompt` allows it, decided once by decide_share_prompt on the first
    batch, else by logprobs.forward_logps. keep_logits (the exact KL) and log_sum_sq (WPO's log sum_v p^2 per
    answer token, from the log-prob head) always take the standard forward."""

    def __init__(self, share_prompt: SharePrompt, pad_token_id: int, padding_buckets: PaddingBuckets,
                 keep_logits: bool, who: str, log_sum_sq: bool = False):
        self.share_prompt, self.pad_token_id, self.who = share_prompt, pad_token_id, who
        self.padding_buckets, self.keep_logits, self.log_sum_sq = padding_buckets, keep_logits, log_sum_sq
        self.shared: bool | None = False if keep_logits or log_sum_sq else None  # None: not decided yet

    def __call__(self, model: torch.nn.Module, pairs: Sequence[TokenizedPair],
                 batch: dict[str, torch.Tensor]) -> ForwardLogps:
        """batch: collate_pairs(pairs) on the model's device, under the caller's autocast."""
        if self.shared is None:
            self.shared = decide_share_prompt(model, self.share_prompt, pairs, batch, self.pad_token_id, self.who)
        if self.shared:
            return shared_forward_logps(model, pairs, batch["answer_mask"], self.pad_token_id, self.padding_buckets)
        return forward_logps(model, batch, keep_logits=self.keep_logits, padding_buckets=self.padding_buckets,
                             log_sum_sq=self.log_sum_sq)


def _refuse(share_prompt: SharePrompt, who: str, reason: str) -> bool:
    if share_prompt is True:
        raise ValueError(f"{who}: train.share_prompt=true but {reason}; set train.share_prompt to auto or false")
    logger.warning("%s: standard forward (prompt computed twice), not the shared-prompt one: %s", who, reason)
    return False
