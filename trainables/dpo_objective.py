"""The DPO objective: preference loss + kl_weight * a KL penalty on answer tokens, and its metrics.

L_total = L_pref(beta) + kl_weight * (mean over answer tokens of the penalty estimator), where the
estimator is k2 = (log pi(y_t) - log pi_ref(y_t))^2 / 2 on the dataset's answer tokens (finite for any
log-ratio: a second-order approximation of KL around the reference, not an estimate of KL far from it),
or the exact full-vocabulary KL when the reference model is live and dpo.kl_estimator is `exact`.
The preference loss (any of the family, trainables/preference_loss.py) is built once, before training,
from the run's LossSpec; losses with state (bco_pair) keep it across steps, ranks and resume
(`state_dict`, saved in every checkpoint). The reference values come from one of three sources: the
precomputed cache, a live reference model, or none (reference-free: reference log-probs are 0).

`eval/kl` is the exact per-token KL(pi || pi_ref) over the full vocabulary at the held-out answer
positions, whatever the penalty: the reference's distributions come from a reference model run live at
evaluation (`ReferenceDistributions`: the live reference itself, the LoRA policy with its adapters off, or,
with precomputed log-probs, the reference model loaded at the first evaluation and kept), beside the
sequence-level log-ratio statistics `eval/log_ratio_chosen`, `eval/log_ratio_rejected` and the penalty's
own value `eval/kl_penalty`. Policy (and live-reference) log-probs come from the
shared-prompt forward (trainables/shared_prompt.py: each prompt computed once for chosen and rejected)
when `share_prompt` allows it and its probe agrees, else from logprobs.forward_logps; the exact KL (full
logits) and WPO (log sum_v pi(v)^2 per answer token, from the log-prob head) always use the latter. Used by trainables/loop.py; tested by
`python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from trainables.bucketing import PaddingBuckets
from trainables.logprobs import padding_buckets_for_world, split_chosen_rejected
from trainables.loop import all_reduce_sums, rank_and_world
from trainables import loss_family as family
from trainables.losses import exact_token_kl, k2_token_kl
from trainables.preference_loss import PairLogps, PreferenceLoss
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


class ReferenceDistributions:
    """The reference's full next-token distributions for the exact `eval/kl`, from a reference model run at
    evaluation: `load()` gives a LiveReference that keeps logits, called once, at the first evaluation.

    Cost: one reference forward per held-out batch per evaluation, the (2B, seq, vocab) logits of policy and
    reference for one batch at a time, and, with precomputed reference log-probs, the reference's weights in
    memory from the first evaluation on (none extra when the reference is live or is the LoRA policy).
    """

    def __init__(self, load: Callable[[], LiveReference]):
        self._load, self._live = load, None

    def logits(self, pairs: Sequence[TokenizedPair], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, seq, vocab) reference logits aligned with the tokens they predict."""
        if self._live is None:
            self._live = self._load()
        return self._live.values("eval", range(len(pairs)), pairs, batch).logits



def host_values(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metric sums (0-d tensors on the model's device) as floats with one device-to-host transfer.

    Each .item() is a host sync that waits for the GPU; a micro-batch's dozen metrics stacked and read once
    cost one (issue 19). Values are read as float64, so float32 and integer sums come back exactly as .item()
    would return them.
    """
    keys = list(sums)
    device = next((v.device for v in sums.values() if v.device.type != "cpu"), torch.device("cpu"))
    stacked = torch.stack([sums[key].detach().to(device=device, dtype=torch.float64).reshape(()) for key in keys])
    return dict(zip(keys, stacked.tolist()))

class DPOObjective:
    """Computes one micro-batch's DPO loss and the sums behind the train/ and eval/ metrics."""

    def __init__(
        self,
        *,
        train_pairs: Sequence[TokenizedPair],
        eval_pairs: Sequence[TokenizedPair],
        reference: CachedReference | LiveReference | NoReference,
        loss: PreferenceLoss,
        beta: float,
        kl_weight: float,
        exact_kl: bool,
        pad_token_id: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        eval_batch_size: int,
        padding_buckets: PaddingBuckets,
        share_prompt: SharePrompt = "auto",
        reference_distributions: ReferenceDistributions | None = None,
    ):
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.reference, self.loss = reference, loss
        self.beta, self.kl_weight, self.exact_kl = beta, kl_weight, exact_kl
        self.pad_token_id, self.device = pad_token_id, device
        self.autocast_dtype, self.eval_batch_size = autocast_dtype, eval_batch_size
        self.reference_distributions = reference_distributions
        self.has_reference = not isinstance(reference, NoReference)
        self.dataset_size = len(train_pairs)
        self.answer_tokens = [len(p.chosen_ids) + len(p.rejected_ids) for p in train_pairs]
        # forwards per micro-batch (padding_buckets: 1, K or "auto"); share_prompt: "auto" | True | False
        buckets = padding_buckets_for_world(padding_buckets)
        weighting = loss.spec.use_weighting  # WPO: log sum_v pi(v)^2 per answer token, from the log-prob head
        self.forward = PairForward(share_prompt, pad_token_id, buckets, exact_kl, "policy", log_sum_sq=weighting)
        self.eval_forward = (PairForward(False, pad_token_id, buckets, True, "policy (evaluation)", log_sum_sq=weighting)
                             if reference_distributions is not None else self.forward)
        if (exact_kl or weighting) and share_prompt is True:
            logger.warning("share_prompt=true ignored: the exact KL and WPO use the standard forward")

    def token_count(self, indices: Sequence[int]) -> int:
        return sum(self.answer_tokens[i] for i in indices)

    def state_dict(self) -> dict:
        """The running state to checkpoint: the preference loss's (bco_pair's reward mean; {} otherwise)."""
        return {"preference_loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a checkpoint's state; None (a checkpoint written before losses kept state) is refused
        only when this loss has state to restore."""
        if state is None:
            if self.loss.state_dict():
                raise ValueError(f"the checkpoint holds no running state for loss {'+'.join(self.loss.spec.names)}; "
                                 f"resume from a checkpoint of a run with this loss")
            return
        self.loss.load_state_dict(state["preference_loss"])

    def _pair_logps(self, policy, reference: ReferenceValues, answer_mask: torch.Tensor) -> PairLogps:
        """What the preference loss reads, from the forwards: summed (or LD-DPO) log-probs, lengths, WPO weights."""
        spec = self.loss.spec
        policy_sums = policy.sequence_logps  # (2B,)
        if spec.ld_alpha is None:
            policy_logps = policy_sums
            reference_logps = torch.cat([reference.chosen_logps, reference.rejected_logps]).to(policy_sums.dtype)
        else:
            policy_logps = family.ld_dpo_logps(policy.token_logps, answer_mask, spec.ld_alpha)  # (2B,)
            reference_logps = (torch.zeros_like(policy_sums) if reference.token_logps is None else
                               family.ld_dpo_logps(reference.token_logps.to(policy_sums.dtype), answer_mask, spec.ld_alpha))
        lengths = family.answer_lengths(answer_mask).to(policy_sums.dtype)  # (2B,)
        weights = None
        if spec.use_weighting:  # WPO: log sum_v pi(v)^2 at each answer position, from the log-prob head
            weights = family.wpo_weights(policy.token_logps, policy.log_sum_sq_probs, answer_mask)
        policy_chosen, policy_rejected = split_chosen_rejected(policy_logps)
        reference_chosen, reference_rejected = split_chosen_rejected(reference_logps)
        chosen_lengths, rejected_lengths = split_chosen_rejected(lengths)
        chosen_weights, rejected_weights = (None, None) if weights is None else split_chosen_rejected(weights)
        return PairLogps(policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths,
                         rejected_lengths, split_chosen_rejected(policy_sums)[0] if spec.ld_alpha is not None else None,
                         chosen_weights, rejected_weights)

    def _sums(self, model, pairs, indices, split) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(summed preference loss, summed token KL penalty, metric sums) for one batch of pairs."""
        batch_pairs = [pairs[i] for i in indices]
        batch = {k: v.to(self.device) for k, v in collate_pairs(batch_pairs, self.pad_token_id).items()}
        answer_mask = batch["answer_mask"]  # (2B, seq)
        forward = self.eval_forward if split == "eval" else self.forward
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            policy = forward(model, batch_pairs, batch)
        reference = self.reference.values(split, indices, batch_pairs, batch)
        logps = self._pair_logps(policy, reference, answer_mask)
        out = self.loss(logps, self.beta, update_state=split == "train")
        if self.exact_kl and reference.logits is not None:
            token_kl = exact_token_kl(policy.logits, reference.logits, answer_mask)  # (2B, seq)
        elif reference.token_logps is not None:
            token_kl = k2_token_kl(policy.token_logps, reference.token_logps, answer_mask)  # (2B, seq)
        else:
            token_kl = torch.zeros_like(policy.token_logps)
        margins = out.chosen_rewards - out.rejected_rewards  # (B,)
        policy_chosen, policy_rejected = split_chosen_rejected(policy.sequence_logps.detach())  # (B,) summed log-probs
        sums = {  # tensors until host_values: one device-to-host copy per micro-batch, not one per metric
            "preference_loss": out.losses.detach().sum(),
            "correct": (margins > 0).sum(),
            "margin": margins.sum(),
            "reward_chosen": out.chosen_rewards.sum(),
            "reward_rejected": out.rejected_rewards.sum(),
            "logp_chosen": policy_chosen.sum(),
            "logp_rejected": policy_rejected.sum(),
            "kl": token_kl.detach().sum(),
            "answer_tokens": answer_mask.sum(),
            "pairs": torch.tensor(float(len(indices))),
            "tokens": batch["attention_mask"].sum(),
        }
        if split == "eval":  # margin against answer-length difference: the length-exploitation diagnosis
            chosen_lengths, rejected_lengths = split_chosen_rejected(answer_mask.sum(-1).double())  # (B,) each
            length_difference = chosen_lengths - rejected_lengths  # (B,)
            sums["length_difference"] = length_difference.sum()
            sums["length_difference_sq"] = length_difference.square().sum()
            sums["margin_sq"] = margins.double().square().sum()
            sums["margin_length"] = (margins.double() * length_difference).sum()
        if split == "eval" and self.has_reference:
            sums["log_ratio_chosen"] = (policy_chosen - reference.chosen_logps).sum()
            sums["log_ratio_rejected"] = (policy_rejected - reference.rejected_logps).sum()
            if self.reference_distributions is not None:
                reference_logits = (reference.logits if reference.logits is not None
                                    else self.reference_distributions.logits(batch_pairs, batch))
                sums["exact_kl"] = exact_token_kl(policy.logits, reference_logits, answer_mask).sum()
        return out.losses.sum(), token_kl.sum(), host_values(sums)

    def micro_batch(self, model, indices, global_batch_size, global_token_count):
        preference_loss, kl_sum, sums = self._sums(model, self.train_pairs, indices, "train")
        loss = preference_loss / global_batch_size + self.kl_weight * kl_sum / max(global_token_count, 1)
        return loss, sums

    def summarize(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        tokens = max(sums["answer_tokens"], 1.0)
        penalty = sums["kl"] / tokens
        preference_loss = sums["preference_loss"] / pairs
        metrics = {
            f"{prefix}/loss": preference_loss + self.kl_weight * penalty,
            f"{prefix}/preference_loss": preference_loss,
            f"{prefix}/preference_accuracy": sums["correct"] / pairs,
            f"{prefix}/reward_margin": sums["margin"] / pairs,
            f"{prefix}/reward_chosen": sums["reward_chosen"] / pairs,
            f"{prefix}/reward_rejected": sums["reward_rejected"] / pairs,
            f"{prefix}/logp_chosen": sums["logp_chosen"] / pairs,
            f"{prefix}/logp_rejected": sums["logp_rejected"] / pairs,
        }
        if "margin_length" in sums:
            metrics[f"{prefix}/margin_length_correlation"] = _correlation(
                sums["pairs"], sums["length_difference"], sums["margin"], sums["length_difference_sq"],
                sums["margin_sq"], sums["margin_length"])
        if not self.has_reference:
            return metrics  # reference-free: no KL to any reference, no log-ratios
        metrics[f"{prefix}/kl"] = penalty  # train/: the penalty's estimator (k2 or exact), per answer token
        if "log_ratio_chosen" in sums:
            metrics[f"{prefix}/log_ratio_chosen"] = sums["log_ratio_chosen"] / pairs
            metrics[f"{prefix}/log_ratio_rejected"] = sums["log_ratio_rejected"] / pairs
        if "exact_kl" in sums:
            metrics[f"{prefix}/kl_penalty"] = penalty
            metrics[f"{prefix}/kl"] = sums["exact_kl"] / tokens  # exact KL(pi || pi_ref), nats per answer token
        return metrics

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
        if not totals:  # this rank had no eval pairs: zeros under every key the others sum
            keys = ["preference_loss", "correct", "margin", "reward_chosen", "reward_rejected", "logp_chosen",
                    "logp_rejected", "kl", "answer_tokens", "pairs", "tokens", "length_difference",
                    "length_difference_sq", "margin_sq", "margin_length"]
            if self.has_reference:
                keys += ["log_ratio_chosen", "log_ratio_rejected"] + (["exact_kl"] if self.reference_distributions else [])
            totals = {k: 0.0 for k in keys}
        return self.summarize(all_reduce_sums(totals, self.device), "eval")


def _correlation(n: float, sum_x: float, sum_y: float, sum_xx: float, sum_yy: float, sum_xy: float) -> float:
    """Pearson correlation of x and y from their sums over n pairs (sums all-reduce over ranks); 0 when
    either is constant (no length difference, or equal margins)."""
    covariance = n * sum_xy - sum_x * sum_y
    spread = (n * sum_xx - sum_x ** 2) * (n * sum_yy - sum_y ** 2)
    return covariance / spread ** 0.5 if spread > 1e-12 * max(1.0, abs(n * sum_xx) * abs(n * sum_yy)) else 0.0
