"""The preference loss the engine optimises, built once from a LossSpec: terms, options and running state.

    loss = build_preference_loss(spec)                  # once, before training (checks the spec)
    out = loss(PairLogps(...), beta, update_state=True)  # per training micro-batch; False for evaluation
    out.losses, out.chosen_rewards, out.rejected_rewards  # (B,) each, as the classic losses return

The per-pair loss is  W_i * sum_k weight_k * L_k(i)  with L_k the functions of trainables/loss_family.py,
applied to f-divergence scores of the (LD-DPO) log-ratios, and W_i = w(y_w) w(y_l) the WPO weights when
`use_weighting` is on, exactly as TRL's DPOTrainer composes them. The rewards are beta * (log pi - log
pi_ref) of the (LD-DPO) log-probs, as TRL reports them; SimPO's are beta * log pi / |y|.

bco_pair keeps the running mean of the training rewards (`RunningRewardMean`): updated by every training
call (all-reduced over ranks when torch.distributed is initialised, so every rank must make the same
number of training calls), read but not updated by evaluation calls, and saved and restored with
`state_dict` / `load_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from trainables import loss_family as family
from trainables.loss_options import LOSS_NAMES, LossSpec, check_loss_spec
from trainables.losses import PreferenceLossOutput


@dataclass(frozen=True)
class PairLogps:
    """One micro-batch of B pairs as the loss reads it; every tensor is (B,).

    policy_* / reference_*: log pi(y|x) summed over the answer tokens, or LD-DPO's log-probs
        (loss_family.ld_dpo_logps) when spec.ld_alpha is set; reference zeros when the loss is reference-free.
    chosen_lengths / rejected_lengths: answer token counts; needed when spec.needs_lengths.
    policy_chosen_token_sums: the plain sum of the chosen answers' token log-probs; needed by sft when
        LD-DPO changed policy_chosen (None: policy_chosen is that sum).
    chosen_weights / rejected_weights: WPO weights (loss_family.wpo_weights); needed when spec.use_weighting.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    policy_chosen_token_sums: torch.Tensor | None = None
    chosen_weights: torch.Tensor | None = None
    rejected_weights: torch.Tensor | None = None


def pair_logps_from_tokens(
    policy_token_logps: torch.Tensor,
    reference_token_logps: torch.Tensor | None,
    answer_mask: torch.Tensor,
    *,
    ld_alpha: float | None,
    log_sum_sq_probs: torch.Tensor | None = None,
) -> PairLogps:
    """PairLogps from (2B, seq_len) token log-probs in the collate layout (rows [0:B] chosen, [B:2B] rejected).

    reference_token_logps None: reference-free (zeros). log_sum_sq_probs: the policy's log sum_v pi(v)^2 per
    position (loss_family.log_sum_squared_probs), given only for WPO. Prompt and padding positions never count.
    """
    in_answer = answer_mask != 0
    zero = torch.zeros_like(policy_token_logps)
    sums = torch.where(in_answer, policy_token_logps, zero).sum(dim=1)  # (2B,)
    if ld_alpha is None:
        policy = sums
        reference = (torch.zeros_like(sums) if reference_token_logps is None
                     else torch.where(in_answer, reference_token_logps.to(sums.dtype), zero).sum(dim=1))
    else:
        policy = family.ld_dpo_logps(policy_token_logps, answer_mask, ld_alpha)
        reference = (torch.zeros_like(sums) if reference_token_logps is None
                     else family.ld_dpo_logps(reference_token_logps.to(sums.dtype), answer_mask, ld_alpha))
    lengths = family.answer_lengths(answer_mask).to(sums.dtype)
    weights = (None if log_sum_sq_probs is None
               else family.wpo_weights(policy_token_logps, log_sum_sq_probs, answer_mask))
    policy_chosen, policy_rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    chosen_weights, rejected_weights = (None, None) if weights is None else weights.chunk(2)
    return PairLogps(policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths,
                     rejected_lengths, policy_chosen_token_sums=sums.chunk(2)[0] if ld_alpha is not None else None,
                     chosen_weights=chosen_weights, rejected_weights=rejected_weights)


class RunningRewardMean:
    """The mean of every training reward so far (chosen and rejected alike, over all ranks): BCO's delta.

    Each update adds the batch's rewards first, so the batch's own rewards count in the delta it gets (as
    the BCO paper's and trl's original implementation did). Sums are float64 Python floats.
    """

    def __init__(self) -> None:
        self.reward_sum, self.reward_count = 0.0, 0.0

    @property
    def mean(self) -> float:
        return self.reward_sum / self.reward_count if self.reward_count else 0.0

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> float:
        """Add a batch of rewards (any shape); all-reduced over ranks when torch.distributed is initialised."""
        packed = torch.stack([rewards.detach().double().sum(),
                              torch.tensor(float(rewards.numel()), dtype=torch.float64, device=rewards.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        reward_sum, reward_count = packed.tolist()
        self.reward_sum += reward_sum
        self.reward_count += reward_count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"reward_sum": self.reward_sum, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.reward_sum, self.reward_count = float(state["reward_sum"]), float(state["reward_count"])


@dataclass(frozen=True)
class _Derived:
    """What the terms read, computed once per call."""

    batch: PairLogps
    chosen_logratios: torch.Tensor  # u_w
    rejected_logratios: torch.Tensor  # u_l
    chosen_scores: torch.Tensor  # s_w = f'(exp u_w)
    rejected_scores: torch.Tensor  # s_l
    margin: torch.Tensor  # d = s_w - s_l
    reward_shift: float  # bco_pair's delta


_Term = Callable[[_Derived, float, LossSpec], torch.Tensor]

LOSS_TERMS: dict[str, _Term] = {
    "sigmoid": lambda x, beta, spec: family.sigmoid_loss(x.margin, beta),
    "cdpo": lambda x, beta, spec: family.cdpo_loss(x.margin, beta, spec.label_smoothing),
    "hinge": lambda x, beta, spec: family.hinge_loss(x.margin, beta),
    "ipo": lambda x, beta, spec: family.ipo_loss(
        x.chosen_scores, x.rejected_scores, x.batch.chosen_lengths, x.batch.rejected_lengths, beta),
    "exo_pair": lambda x, beta, spec: family.exo_pair_loss(x.margin, beta, spec.label_smoothing),
    "nca_pair": lambda x, beta, spec: family.nca_pair_loss(x.chosen_logratios, x.rejected_logratios, beta),
    "robust": lambda x, beta, spec: family.robust_loss(x.margin, beta, spec.label_smoothing),
    "bco_pair": lambda x, beta, spec: family.bco_pair_loss(
        x.chosen_logratios, x.rejected_logratios, beta, x.reward_shift),
    "sppo_hard": lambda x, beta, spec: family.sppo_hard_loss(x.chosen_logratios, x.rejected_logratios, beta),
    "aot": lambda x, beta, spec: family.aot_loss(
        x.batch.policy_chosen, x.batch.policy_rejected, x.batch.reference_chosen, x.batch.reference_rejected, beta,
        spec.label_smoothing),
    "aot_unpaired": lambda x, beta, spec: family.aot_unpaired_loss(
        x.chosen_logratios, x.rejected_logratios, beta, spec.label_smoothing),
    "apo_zero": lambda x, beta, spec: family.apo_zero_loss(x.chosen_logratios, x.rejected_logratios, beta),
    "apo_down": lambda x, beta, spec: family.apo_down_loss(x.chosen_logratios, x.rejected_logratios, beta),
    "discopop": lambda x, beta, spec: family.discopop_loss(x.margin, beta, spec.discopop_tau),
    "sft": lambda x, beta, spec: family.sft_loss(
        x.batch.policy_chosen if x.batch.policy_chosen_token_sums is None else x.batch.policy_chosen_token_sums,
        x.batch.chosen_lengths),
    "sigmoid_norm": lambda x, beta, spec: family.sigmoid_norm_loss(
        x.chosen_scores, x.rejected_scores, x.batch.chosen_lengths, x.batch.rejected_lengths, beta),
    "simpo": lambda x, beta, spec: family.simpo_loss(
        x.batch.policy_chosen, x.batch.policy_rejected, x.batch.chosen_lengths, x.batch.rejected_lengths, beta,
        spec.simpo_gamma, spec.label_smoothing),
}
assert set(LOSS_TERMS) == set(LOSS_NAMES), "one term per name of trainables.loss_options.LOSS_NAMES"


class PreferenceLoss:
    """A checked LossSpec, callable on PairLogps; holds bco_pair's running mean when it is one of the terms."""

    def __init__(self, spec: LossSpec):
        check_loss_spec(spec)
        self.spec = spec
        self.terms = tuple((LOSS_TERMS[name], weight) for name, weight in zip(spec.names, spec.weights))
        self.reward_mean = RunningRewardMean() if spec.stateful else None

    def __call__(self, batch: PairLogps, beta: float, *, update_state: bool) -> PreferenceLossOutput:
        """Per-pair losses and rewards; update_state: True for training batches, False for evaluation."""
        self._check(batch, beta)
        chosen_logratios = batch.policy_chosen - batch.reference_chosen  # (B,)
        rejected_logratios = batch.policy_rejected - batch.reference_rejected  # (B,)
        if "simpo" in self.spec.names:
            chosen_rewards = beta * (batch.policy_chosen / batch.chosen_lengths.clamp(min=1.0)).detach()
            rejected_rewards = beta * (batch.policy_rejected / batch.rejected_lengths.clamp(min=1.0)).detach()
        else:
            chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
        reward_shift = 0.0
        if self.reward_mean is not None:
            rewards = torch.cat([beta * chosen_logratios.detach(), beta * rejected_logratios.detach()])
            reward_shift = self.reward_mean.update(rewards) if update_state else self.reward_mean.mean
        chosen_scores = family.f_divergence_scores(chosen_logratios, self.spec.f_divergence, self.spec.f_alpha)
        rejected_scores = family.f_divergence_scores(rejected_logratios, self.spec.f_divergence, self.spec.f_alpha)
        derived = _Derived(batch, chosen_logratios, rejected_logratios, chosen_scores, rejected_scores,
                           chosen_scores - rejected_scores, reward_shift)
        losses = None
        for term, weight in self.terms:
            per_pair = term(derived, beta, self.spec)
            if self.spec.use_weighting:
                per_pair = per_pair * (batch.chosen_weights * batch.rejected_weights)
            losses = per_pair * weight if losses is None else losses + per_pair * weight
        return PreferenceLossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)

    def _check(self, batch: PairLogps, beta: float) -> None:
        if not beta > 0:
            raise ValueError(f"the preference loss needs beta > 0, got {beta}")
        required = ["policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected"]
        if self.spec.needs_lengths:
            required += ["chosen_lengths", "rejected_lengths"]
        if self.spec.use_weighting:
            required += ["chosen_weights", "rejected_weights"]
        if self.spec.ld_alpha is not None and "sft" in self.spec.names:
            required.append("policy_chosen_token_sums")
        missing = [name for name in required if getattr(batch, name) is None]
        if missing:
            raise ValueError(f"loss {'+'.join(self.spec.names)} (use_weighting={self.spec.use_weighting}, "
                             f"ld_alpha={self.spec.ld_alpha}) needs PairLogps.{', '.join(missing)}")
        shapes = {name: tuple(getattr(batch, name).shape) for name in required}
        if len(set(shapes.values())) != 1 or batch.policy_chosen.dim() != 1:
            raise ValueError(f"preference losses need (batch,) tensors of one shape, got {shapes}. Sum (or "
                             f"LD-combine) the per-token log-probs over the answer tokens first.")

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The running state to checkpoint ({} for stateless losses); identical on every rank."""
        return {} if self.reward_mean is None else {"bco_pair": self.reward_mean.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"preference loss state has keys {sorted(state)}, expected {sorted(expected)} for loss "
                             f"{'+'.join(self.spec.names)}")
        if self.reward_mean is not None:
            self.reward_mean.load_state_dict(state["bco_pair"])


def build_preference_loss(spec: LossSpec) -> PreferenceLoss:
    """Check `spec` and build its loss, once, outside the training loop."""
    return PreferenceLoss(spec)


def loss_at_zero_log_ratio(spec: LossSpec, beta: float) -> float | None:
    """The per-pair loss when the policy equals the reference (every log-ratio 0, fresh state): the first
    train/loss to expect (kl_weight aside). None when it depends on the policy itself: sft, simpo, WPO."""
    if not spec.needs_reference or "sft" in spec.names or spec.use_weighting:
        return None
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    batch = PairLogps(zero, zero, zero, zero, one, one)
    return PreferenceLoss(spec)(batch, beta, update_state=False).losses.item()
