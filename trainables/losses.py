"""DPO-family preference losses and the KL penalty, as pure functions of log-prob tensors.

Every preference loss takes the same five arguments, (policy_chosen_logps, policy_rejected_logps,
reference_chosen_logps, reference_rejected_logps, beta), each logps tensor of shape (batch,) holding
log pi(y|x) summed (or, for IPO, usually averaged) over the answer tokens, and returns a
`PreferenceLossOutput`. No model, no config: the caller picks one function once with
`preference_loss_by_name` and calls it in the loop. With the log-ratio margin
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
the variants differ only in the function of h they minimise.

These are the four classic losses (sigmoid, ipo, cdpo, hinge) with the five-argument signature. The
whole family, every TRL DPOTrainer loss type plus cdpo and SimPO, with f-divergences, WPO, LD-DPO,
weighted sums and bco_pair's running state, is built from a `LossSpec` (trainables/loss_options.py) by
`trainables.preference_loss.build_preference_loss`; its formulas are in trainables/loss_family.py.

The KL term of the notes, L_total = L_DPO + kl_weight * KL(pi_theta || pi_ref), is built from
`k2_token_kl` (a finite squared log-ratio penalty; works with cached reference log-probs) or
`exact_token_kl` (needs full reference logits), reduced with `masked_token_mean`.

Tested by `python -m pytest tests/test_losses.py -q`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainables.loss_options import LOSS_NAMES, LossSpec, check_loss_spec


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-pair losses plus the implicit rewards every variant reports."""

    losses: torch.Tensor  # (batch,) per-pair loss, differentiable
    chosen_rewards: torch.Tensor  # (batch,) beta * (policy_chosen_logps - reference_chosen_logps), detached
    rejected_rewards: torch.Tensor  # (batch,) beta * (policy_rejected_logps - reference_rejected_logps), detached


PreferenceLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], PreferenceLossOutput
]


def _log_ratio_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (pc - rc) - (pr - rr), after checking the four tensors line up. Returns (batch,)."""
    shapes = {
        "policy_chosen_logps": tuple(policy_chosen_logps.shape),
        "policy_rejected_logps": tuple(policy_rejected_logps.shape),
        "reference_chosen_logps": tuple(reference_chosen_logps.shape),
        "reference_rejected_logps": tuple(reference_rejected_logps.shape),
    }
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(
            f"preference losses need four (batch,) log-prob tensors of the same shape, "
            f"got {shapes}. Sum (or average) the per-token log-probs over the answer tokens first."
        )
    chosen_log_ratios = policy_chosen_logps - reference_chosen_logps  # (batch,)
    rejected_log_ratios = policy_rejected_logps - reference_rejected_logps  # (batch,)
    return chosen_log_ratios - rejected_log_ratios  # (batch,)


def _output(
    losses: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """Attach the detached implicit rewards r = beta * log(pi / pi_ref) to the per-pair losses."""
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()  # (batch,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()  # (batch,)
    return PreferenceLossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


def sigmoid_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """The original DPO loss, Rafailov et al. 2023 (arXiv 2305.18290), eq. 7:

        L = -log sigma(beta * h),   h = (log pi(y_w)/pi_ref(y_w)) - (log pi(y_l)/pi_ref(y_l))

    i.e. the Bradley-Terry negative log-likelihood of the implicit rewards r = beta log(pi/pi_ref).
    Its gradient is dL/d log pi(y_w) = -beta sigma(r_l - r_w) = -dL/d log pi(y_l).
    Computed with F.logsigmoid, which stays finite for large |beta h|.
    """
    margin = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )  # (batch,)
    losses = -F.logsigmoid(beta * margin)  # (batch,)
    return _output(
        losses, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """Identity preference optimisation, Azar et al. 2023 (arXiv 2310.12036), eq. 17:

        L = (h - 1 / (2 beta))^2

    with beta playing the role of the paper's regulariser tau. Unlike the sigmoid loss it does not push
    h to infinity on deterministic preferences; it regresses h to a fixed target 1/(2 beta).
    IPO is usually run with length-AVERAGED log-probs (mean over answer tokens, not the sum); this
    function uses whatever log-probs the caller passes, so the caller decides.
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss needs beta > 0 (target is 1/(2 beta)), got beta={beta}.")
    margin = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )  # (batch,)
    losses = (margin - 1.0 / (2.0 * beta)) ** 2  # (batch,)
    return _output(
        losses, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )


def conservative_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.1,
) -> PreferenceLossOutput:
    """Conservative DPO (cDPO), Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO":

        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    the DPO loss when each preference label is assumed flipped with probability eps = label_smoothing.
    eps = 0 is exactly `sigmoid_dpo_loss`; the minimum is at a finite margin beta h = log((1-eps)/eps).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"conservative_dpo_loss needs 0 <= label_smoothing < 0.5 (the assumed "
            f"label-flip probability), got {label_smoothing}. Typical values are 0.05 to 0.2."
        )
    margin = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )  # (batch,)
    losses = (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    )  # (batch,)
    return _output(
        losses, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLossOutput:
    """Hinge (SLiC-style) calibration loss, Zhao et al. 2023 (arXiv 2305.10425):

        L = max(0, 1 - beta h)

    SLiC writes max(0, delta - log pi(y_w) + log pi(y_l)); here the margin is measured against the
    reference (h) and beta = 1/delta scales it, so pairs with beta h >= 1 contribute no gradient.
    """
    margin = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )  # (batch,)
    losses = torch.relu(1.0 - beta * margin)  # (batch,)
    return _output(
        losses, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )


PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_dpo_loss,
    "ipo": ipo_loss,
    "cdpo": conservative_dpo_loss,
    "hinge": hinge_loss,
}
assert set(PREFERENCE_LOSSES) <= set(LOSS_NAMES), "every classic loss is a name of the loss family"


def preference_loss_by_name(name: str, label_smoothing: float = 0.0) -> PreferenceLossFn:
    """Pick one of the four classic losses once, outside the train loop; "cdpo" gets its label_smoothing bound.

    Which label_smoothing goes with which loss is one rule, trainables.loss_options.check_loss_spec. The
    other names of the family read more than four tensors or keep state: build them with
    trainables.preference_loss.build_preference_loss.
    """
    if name not in PREFERENCE_LOSSES:
        if name in LOSS_NAMES:
            raise ValueError(f"preference loss {name!r} is not a five-argument loss: build it with "
                             f"trainables.preference_loss.build_preference_loss(LossSpec(...))")
        raise ValueError(f"unknown preference loss {name!r}; valid names are {sorted(PREFERENCE_LOSSES)} here "
                         f"(build_preference_loss takes every name of the family: {sorted(LOSS_NAMES)})")
    check_loss_spec(LossSpec(names=(name,), weights=(1.0,), label_smoothing=label_smoothing, f_divergence="reverse_kl",
                             f_alpha=0.5, use_weighting=False, ld_alpha=None, simpo_gamma=0.0, discopop_tau=0.05))
    if name == "cdpo":
        return functools.partial(conservative_dpo_loss, label_smoothing=label_smoothing)
    return PREFERENCE_LOSSES[name]


def k2_token_kl(
    policy_token_logps: torch.Tensor,
    reference_token_logps: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """The KL penalty's per-token estimator on dataset answer tokens: k2 = d^2 / 2, d = log pi_theta - log pi_ref.

    Inputs are (sequences, seq_len) log-probs of the tokens actually in the batch (so cached reference
    log-probs suffice) and a float/bool answer mask; returns (sequences, seq_len), zero outside the mask.
    What it is: a squared log-ratio penalty, 0 exactly where the policy's token log-probs equal the
    reference's, with gradient d (linear, so finite for any log-ratio). On samples from the policy its mean
    is KL(pi || pi_ref) to second order around the reference (Schulman 2020, "Approximating KL divergence");
    on dataset tokens far from the reference it is not a KL estimate, only a finite pull back towards it.
    It replaces k3 = exp(-d) + d - 1, which on dataset tokens grows like exp(|d|) wherever the policy pushes a
    token far below the reference (values of 1e8 and more on the quickstart). The KL users read is the exact
    `eval/kl` (trainables/dpo_objective.py).
    """
    if policy_token_logps.shape != reference_token_logps.shape or policy_token_logps.shape != answer_mask.shape:
        raise ValueError(
            f"k2_token_kl needs policy_token_logps, reference_token_logps and "
            f"answer_mask of the same (sequences, seq_len) shape, got {tuple(policy_token_logps.shape)}, "
            f"{tuple(reference_token_logps.shape)}, {tuple(answer_mask.shape)}."
        )
    in_answer = answer_mask != 0  # (sequences, seq_len) bool
    reference = reference_token_logps.to(policy_token_logps.dtype)  # (sequences, seq_len)
    # Zero d outside the answers so prompt/padding positions (possibly garbage in a cache) never count.
    log_ratio = torch.where(in_answer, policy_token_logps - reference, torch.zeros_like(policy_token_logps))
    return 0.5 * log_ratio.square()  # (sequences, seq_len)


def _token_kl_chunk(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """sum_v pi(v) (log pi(v) - log ref(v)) in float32. (rows, positions, vocab) -> (rows, positions)."""
    policy_logprobs = F.log_softmax(policy_logits.float(), dim=-1)  # (rows, positions, vocab)
    reference_logprobs = F.log_softmax(reference_logits.float(), dim=-1)  # (rows, positions, vocab)
    return (policy_logprobs.exp() * (policy_logprobs - reference_logprobs)).sum(-1)  # (rows, positions)


def exact_token_kl(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    answer_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Full-vocabulary KL(pi_theta || pi_ref) at every position, for when the reference model is live:

        KL_t = sum_v pi_theta(v | x, y_<t) * (log pi_theta(v | ...) - log pi_ref(v | ...))

    policy_logits, reference_logits: (sequences, seq_len, vocab), ALIGNED with the tokens they predict
    (position t holds the distribution over token t; the caller shifts). answer_mask: (sequences, seq_len).
    Returns float32 (sequences, seq_len), zero outside the mask. Reference logits are treated as constants.

    Memory: the float32 log-softmaxes are formed one slice of positions at a time, about `chunk_size`
    tokens (rows x positions) per slice. When gradients are needed each slice is checkpointed, so
    backward recomputes it instead of keeping every slice's (tokens, vocab) float32 activations alive.
    """
    if policy_logits.shape != reference_logits.shape or policy_logits.shape[:2] != answer_mask.shape:
        raise ValueError(
            f"exact_token_kl needs policy_logits and reference_logits of the same "
            f"(sequences, seq_len, vocab) shape and answer_mask of shape (sequences, seq_len), got "
            f"{tuple(policy_logits.shape)}, {tuple(reference_logits.shape)}, {tuple(answer_mask.shape)}."
        )
    if chunk_size < 1:
        raise ValueError(f"exact_token_kl chunk_size must be >= 1, got {chunk_size}.")
    sequences, seq_len, _ = policy_logits.shape
    positions_per_chunk = max(1, chunk_size // max(1, sequences))
    reference_logits = reference_logits.detach()
    needs_grad = torch.is_grad_enabled() and policy_logits.requires_grad
    chunks = []
    for start in range(0, seq_len, positions_per_chunk):
        policy_slice = policy_logits[:, start : start + positions_per_chunk]  # (sequences, positions, vocab) view
        reference_slice = reference_logits[:, start : start + positions_per_chunk]  # (sequences, positions, vocab)
        if needs_grad:
            chunk_kl = checkpoint(_token_kl_chunk, policy_slice, reference_slice, use_reentrant=False)
        else:
            chunk_kl = _token_kl_chunk(policy_slice, reference_slice)
        chunks.append(chunk_kl)  # (sequences, positions)
    token_kl = torch.cat(chunks, dim=1).clamp_min(0.0)  # (sequences, seq_len)
    return torch.where(answer_mask != 0, token_kl, torch.zeros_like(token_kl))


def masked_token_mean(
    values: torch.Tensor,
    answer_mask: torch.Tensor,
    token_count: float | None = None,
) -> torch.Tensor:
    """sum(values * mask) / N, N = token_count if given else mask.sum(). Returns a 0-dim tensor.

    values, answer_mask: (sequences, seq_len). Distributed callers pass the global answer-token count as
    token_count so that averaging the per-worker results gives the true global mean. A batch with no
    answer tokens and no token_count gives 0 rather than NaN.
    """
    if values.shape != answer_mask.shape:
        raise ValueError(
            f"masked_token_mean needs values and answer_mask of the same shape, "
            f"got {tuple(values.shape)} and {tuple(answer_mask.shape)}."
        )
    mask = answer_mask.to(values.dtype)  # (sequences, seq_len)
    masked_sum = torch.where(answer_mask != 0, values * mask, torch.zeros_like(values)).sum()
    if token_count is None:
        return masked_sum / mask.sum().clamp_min(1.0)
    if token_count <= 0:
        raise ValueError(
            f"masked_token_mean token_count must be > 0, got {token_count}. "
            f"Pass the number of answer tokens across all workers, or None to use this batch's mask."
        )
    return masked_sum / token_count
