"""The DPO objective: preference loss + kl_weight * KL(pi || pi_ref) on answer tokens, and its metrics.

L_total = L_pref(beta) + kl_weight * mean over answer tokens of k3(d), d = logp_ref - logp_policy
(or the exact full-vocabulary KL when the reference model is live and dpo.kl_estimator is `exact`).
The preference loss function is picked once, by name, before training (trainables/losses.py). The
reference values come from one of three sources: the precomputed cache, a live reference model, or
none (reference-free: reference log-probs are 0). Policy (and live-reference) log-probs come from the
shared-prompt forward (trainables/shared_prompt.py: each prompt computed once for chosen and rejected)
when `share_prompt` allows it and its probe agrees, else from logprobs.forward_logps; exact KL always uses
the latter (it needs full-vocabulary logits). Used by trainables/loop.py; tested by
`python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from trainables.bucketing import PaddingBuckets
from trainables.logprobs import padding_buckets_for_world, split_chosen_rejected
from trainables.loop import all_reduce_sums, rank_and_world
from trainables.losses import PreferenceLossFn, exact_token_kl, k3_token_kl
from trainables.reference_cache import ReferenceLogps
from trainables.shared_prompt import PairForward, SharePrompt
from trainables.sharding import lockstep_padding
from trainables.tokenization import TokenizedPair, collate_pairs

logger = logging.getLogger(__name__)


@dataclass
class ReferenceValues:
    chosen_logps: torch.Tensor  # (B,)
    rejected_logps: torch.Tensor  # (B,)
    token_logps: torch.Tensor | None  # (2B, seq)
    logits: torch.Tensor | None  # (2B, seq, vocab), live reference with exact KL only


class CachedReference:
    """Reference log-probs read from the precomputed cache (no reference model in memory)."""

    def __init__(self, train: ReferenceLogps, eval: ReferenceLogps | None):
        self.by_split = {"train": train, "eval": eval}

    def values(self, split: str, indices: Sequence[int], pairs: Sequence[TokenizedPair],
               batch: dict[str, torch.Tensor]) -> ReferenceValues:
        chosen, rejected, tokens = self.by_split[split].for_batch(indices, batch["answer_mask"])
        return ReferenceValues(chosen, rejected, tokens, None)


class LiveReference:
    """A frozen reference model run next to the policy (needed for the exact KL).

    With LoRA, the reference can be the policy itself with its adapters disabled (`adapters_of_policy`):
    no second model in memory, and the base weights are exactly the model DPO started from.
    """

    def __init__(self, model: torch.nn.Module, keep_logits: bool, autocast_dtype: torch.dtype | None,
                 adapters_of_policy: bool = False, padding_buckets: PaddingBuckets = 1,
                 share_prompt: SharePrompt = "auto", pad_token_id: int = 0):
        self.model = model if adapters_of_policy else model.eval().requires_grad_(False)
        self.adapters_of_policy = adapters_of_policy
        self.autocast_dtype = autocast_dtype
        # pad id: the shared rows' padding only; buckets: see logprobs.forward_logps
        self.forward = PairForward(share_prompt, pad_token_id, padding_buckets_for_world(padding_buckets), keep_logits,
                                   "live reference")

    def _context(self):
        if self.adapters_of_policy:
            return getattr(self.model, "module", self.model).disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def values(self, split: str, indices: Sequence[int], pairs: Sequence[TokenizedPair],
               batch: dict[str, torch.Tensor]) -> ReferenceValues:
        device_type = batch["input_ids"].device.type
        with self._context(), torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            result = self.forward(getattr(self.model, "module", self.model), pairs, batch)
        chosen, rejected = split_chosen_rejected(result.sequence_logps)
        return ReferenceValues(chosen, rejected, result.token_logps, result.logits)


class NoReference:
    """Reference-free preference optimisation: log pi_ref = 0 for every answer."""

    def values(self, split: str, indices: Sequence[int], pairs: Sequence[TokenizedPair],
               batch: dict[str, torch.Tensor]) -> ReferenceValues:
        zeros = torch.zeros(len(indices), device=batch["input_ids"].device)
        return ReferenceValues(zeros, zeros, None, None)


class DPOObjective:
    """Computes one micro-batch's DPO loss and the sums behind the train/ and eval/ metrics."""

    def __init__(
        self,
        *,
        train_pairs: Sequence[TokenizedPair],
        eval_pairs: Sequence[TokenizedPair],
        reference: CachedReference | LiveReference | NoReference,
        loss_fn: PreferenceLossFn,
        beta: float,
        kl_weight: float,
        exact_kl: bool,
        length_normalize: bool,
        pad_token_id: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        eval_batch_size: int,
        padding_buckets: PaddingBuckets,
        share_prompt: SharePrompt = "auto",
    ):
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.reference, self.loss_fn = reference, loss_fn
        self.beta, self.kl_weight = beta, kl_weight
        self.exact_kl, self.length_normalize = exact_kl, length_normalize
        self.pad_token_id, self.device = pad_token_id, device
        self.autocast_dtype, self.eval_batch_size = autocast_dtype, eval_batch_size
        self.dataset_size = len(train_pairs)
        self.answer_tokens = [len(p.chosen_ids) + len(p.rejected_ids) for p in train_pairs]
        # forwards per micro-batch (padding_buckets: 1, K or "auto"); share_prompt: "auto" | True | False
        self.forward = PairForward(share_prompt, pad_token_id, padding_buckets_for_world(padding_buckets), exact_kl,
                                   "policy")
        if exact_kl and share_prompt is True:
            logger.warning("share_prompt=true ignored: the exact KL needs the standard forward's full-vocabulary logits")

    def token_count(self, indices: Sequence[int]) -> int:
        return sum(self.answer_tokens[i] for i in indices)

    def _sums(self, model, pairs, indices, split) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(summed preference loss, summed token KL, metric sums) for one batch of pairs."""
        batch_pairs = [pairs[i] for i in indices]
        batch = {k: v.to(self.device) for k, v in collate_pairs(batch_pairs, self.pad_token_id).items()}
        answer_mask = batch["answer_mask"]  # (2B, seq)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            policy = self.forward(model, batch_pairs, batch)
        reference = self.reference.values(split, indices, batch_pairs, batch)
        policy_chosen, policy_rejected = split_chosen_rejected(policy.sequence_logps)  # (B,), (B,)
        reference_chosen, reference_rejected = reference.chosen_logps, reference.rejected_logps
        if self.length_normalize:
            lengths_chosen, lengths_rejected = split_chosen_rejected(answer_mask.sum(-1).clamp(min=1))
            policy_chosen, policy_rejected = policy_chosen / lengths_chosen, policy_rejected / lengths_rejected
            reference_chosen, reference_rejected = reference_chosen / lengths_chosen, reference_rejected / lengths_rejected
        out = self.loss_fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta)
        if self.exact_kl and reference.logits is not None:
            token_kl = exact_token_kl(policy.logits, reference.logits, answer_mask)  # (2B, seq)
        elif reference.token_logps is not None:
            token_kl = k3_token_kl(policy.token_logps, reference.token_logps, answer_mask)  # (2B, seq)
        else:
            token_kl = torch.zeros_like(policy.token_logps)
        margins = out.chosen_rewards - out.rejected_rewards  # (B,)
        sums = {
            "preference_loss": out.losses.detach().sum().item(),
            "correct": (margins > 0).sum().item(),
            "margin": margins.sum().item(),
            "reward_chosen": out.chosen_rewards.sum().item(),
            "reward_rejected": out.rejected_rewards.sum().item(),
            "logp_chosen": policy_chosen.detach().sum().item(),
            "logp_rejected": policy_rejected.detach().sum().item(),
            "kl": token_kl.detach().sum().item(),
            "answer_tokens": answer_mask.sum().item(),
            "pairs": float(len(indices)),
            "tokens": batch["attention_mask"].sum().item(),
        }
        return out.losses.sum(), token_kl.sum(), sums

    def micro_batch(self, model, indices, global_batch_size, global_token_count):
        preference_loss, kl_sum, sums = self._sums(model, self.train_pairs, indices, "train")
        loss = preference_loss / global_batch_size + self.kl_weight * kl_sum / max(global_token_count, 1)
        return loss, sums

    def summarize(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        kl = sums["kl"] / max(sums["answer_tokens"], 1.0)
        preference_loss = sums["preference_loss"] / pairs
        return {
            f"{prefix}/loss": preference_loss + self.kl_weight * kl,
            f"{prefix}/preference_loss": preference_loss,
            f"{prefix}/preference_accuracy": sums["correct"] / pairs,
            f"{prefix}/reward_margin": sums["margin"] / pairs,
            f"{prefix}/reward_chosen": sums["reward_chosen"] / pairs,
            f"{prefix}/reward_rejected": sums["reward_rejected"] / pairs,
            f"{prefix}/logp_chosen": sums["logp_chosen"] / pairs,
            f"{prefix}/logp_rejected": sums["logp_rejected"] / pairs,
            f"{prefix}/kl": kl,
        }

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Held-out metrics over every rank's share of the eval pairs, all-reduced."""
        if not self.eval_pairs:
            return {}
        rank, world = rank_and_world()
        mine = list(range(rank, len(self.eval_pairs), world))
        totals: dict[str, float] = {}
        for start in range(0, len(mine), self.eval_batch_size):
            _, _, sums = self._sums(model, self.eval_pairs, mine[start : start + self.eval_batch_size], "eval")
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
        for _ in range(lockstep_padding(model, len(self.eval_pairs), len(mine), self.eval_batch_size)):
            self._sums(model, self.eval_pairs, [0], "eval")  # FSDP: keep in step with the other ranks' forwards
        if not totals:
            totals = {k: 0.0 for k in ("preference_loss", "correct", "margin", "reward_chosen", "reward_rejected",
                                       "logp_chosen", "logp_rejected", "kl", "answer_tokens", "pairs", "tokens")}
        return self.summarize(all_reduce_sums(totals, self.device), "eval")
