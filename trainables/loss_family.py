"""The DPO loss family as pure functions: every TRL DPOTrainer loss type, cdpo and SimPO, and the options.

Each loss is a function of (batch,) tensors returning the (batch,) per-pair losses; the equations use

    u_w = log pi(y_w|x) - log pi_ref(y_w|x),  u_l = the same for y_l       (the log-ratios)
    s_w = f'(exp u_w),  s_l = f'(exp u_l)                                   (scores; s = u for reverse KL)
    d = s_w - s_l                                                           (the score margin, h of DPO)
    r_w = beta u_w, r_l = beta u_l                                          (the implicit rewards)
    |y| = the answer's token count

and every formula is the one TRL's DPOTrainer computes (trl 1.16, `DPOTrainer._compute_loss`; SimPO is
`CPOTrainer.cpo_loss`), checked against it in tests/test_losses_trl.py. The options are transforms
around them: `f_divergence_scores` (f-DPO), `ld_dpo_logps` (LD-DPO), `wpo_weights` (WPO). Which names
exist and which combinations are valid: trainables/loss_options.py. How they are put together, with
bco_pair's running state: trainables/preference_loss.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --- the options ----------------------------------------------------------------------------------------

# exp() argument cap of alpha_divergence per dtype, as TRL: exp(t) must stay finite after the cast back.
_ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


def f_divergence_scores(log_ratios: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """The score s = f'(pi/pi_ref) of f-DPO, Wang et al. 2023, "Beyond Reverse KL" (arXiv 2309.16240),
    as a function of the log-ratio u = log pi - log pi_ref (batch,):

        reverse_kl        s = u                                  (f'(t) = log t: standard DPO)
        forward_kl        s = 1 - exp(-u)                        (f'(t) = 1 - 1/t)
        js_divergence     s = log 2 + log sigma(u)               (f'(t) = log(2t / (1 + t)))
        alpha_divergence  s = (exp((a - 1) u) - 1) / (a - 1)     (f'(t) = (t^(a-1) - 1)/(a - 1), a = f_alpha;
                                                                  |a - 1| < 1e-6 is reverse_kl)

    alpha follows TRL's f_alpha_divergence_coef: a = 1 - the paper's alpha. (a - 1) u is capped (80; 11 in
    float16) before exp, computed in float32 for half precisions, as TRL does.
    """
    if f_divergence == "reverse_kl":
        return log_ratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-log_ratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratios)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return log_ratios
        t = (f_alpha - 1.0) * log_ratios
        compute = t if t.dtype == torch.float64 else t.float()
        return (torch.exp(torch.clamp(compute, max=_ALPHA_CLAMP[t.dtype])) - 1.0).to(t.dtype) * (1.0 / (f_alpha - 1.0))
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def answer_lengths(answer_mask: torch.Tensor) -> torch.Tensor:
    """Answer token counts per row: (rows, seq_len) mask -> (rows,), in the collate layout [chosen; rejected]."""
    return (answer_mask != 0).sum(dim=1)


def ld_dpo_logps(token_logps: torch.Tensor, answer_mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """Length-desensitised log-probs of LD-DPO, Liu et al. 2024 (arXiv 2409.06411):

        log p_LD(y|x) = sum_{t <= l_p} log pi(y_t|...) + alpha * sum_{t > l_p} log pi(y_t|...),
        l_p = min(|y_w|, |y_l|)   (the public length of the pair)

    token_logps, answer_mask: (2B, seq_len) in the collate layout, rows [0:B] chosen and [B:2B] rejected,
    with t counting answer tokens in order (prompt and padding positions never count). alpha = 1 is the
    plain sum; alpha = 0 keeps only the first l_p tokens of each answer. Apply it to the policy's and to the
    reference's token log-probs alike. Returns (2B,).
    """
    if token_logps.shape != answer_mask.shape or token_logps.dim() != 2 or token_logps.shape[0] % 2:
        raise ValueError(f"ld_dpo_logps needs token_logps and answer_mask of the same (2B, seq_len) shape, got "
                         f"{tuple(token_logps.shape)} and {tuple(answer_mask.shape)}")
    in_answer = answer_mask != 0
    position = in_answer.long().cumsum(dim=1)  # t = 1..|y| at answer tokens
    chosen_lengths, rejected_lengths = answer_lengths(answer_mask).chunk(2)
    public = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)  # (2B, 1)
    zero = torch.zeros_like(token_logps)
    shared = torch.where(in_answer & (position <= public), token_logps, zero).sum(dim=1)
    tail = torch.where(in_answer & (position > public), token_logps, zero).sum(dim=1)
    return shared + ld_alpha * tail


def log_sum_squared_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v pi(v)^2 at each position, in float32: logsumexp(2 z) - 2 logsumexp(z). (..., vocab) -> (...)."""
    logits = logits.float()
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def wpo_weights(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Per-answer weights of WPO, Zhou et al. 2024 (arXiv 2406.11827), eq. 2 with TRL's alignment:

        w(y|x) = exp( (1/|y|) sum_t [ log pi(y_t|...) - log sum_v pi(v|...)^2 ] )

    the policy's length-normalised probability of the answer, divided at each token by the probability of
    a token sampled from the policy (so a weight near 1 means "as likely as the policy's own samples").
    Inputs (2B, seq_len); returns (2B,) detached. The loss of a pair is multiplied by w(y_w) w(y_l).
    """
    in_answer = answer_mask != 0
    aligned = torch.where(in_answer, token_logps - log_sum_sq_probs.to(token_logps.dtype),
                          torch.zeros_like(token_logps))
    return torch.exp(aligned.sum(dim=1) / answer_lengths(answer_mask).clamp_min(1))


# --- the losses -----------------------------------------------------------------------------------------

def sigmoid_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), eq. 7:  L = -log sigma(beta d)."""
    return -F.logsigmoid(beta * margin)


def cdpo_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO":

        L = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d),   eps = label_smoothing in (0, 0.5)
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def hinge_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-style hinge, Zhao et al. 2023 (arXiv 2305.10425):  L = max(0, 1 - beta d)."""
    return torch.relu(1 - beta * margin)


def ipo_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO, Azar et al. 2023 (arXiv 2310.12036), eq. 17, on per-token averages (as TRL, confirmed with the authors):

        L = (s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2       (beta is the paper's tau)
    """
    margin = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
    return (margin - 1 / (2 * beta)) ** 2


def exo_pair_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (pair form), Ji et al. 2024 (arXiv 2402.00856), eq. 16: KL(q || p) over {y_w, y_l} with
    q = (sigma(beta d), sigma(-beta d)) and the smoothed label p = (1 - eps, eps):

        L = sigma(beta d) (log sigma(beta d) - log(1 - eps)) + sigma(-beta d) (log sigma(-beta d) - log eps)
    """
    log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
    return (torch.sigmoid(beta * margin) * (F.logsigmoid(beta * margin) - log_pw)
            + torch.sigmoid(-beta * margin) * (F.logsigmoid(-beta * margin) - log_pl))


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA (pair form), Chen et al. 2024, "Noise Contrastive Alignment" (arXiv 2402.05369):

        L = -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l)
    """
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def robust_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409): the unbiased loss under label flips with
    probability eps = label_smoothing in [0, 0.5):

        L = ( -(1 - eps) log sigma(beta d) + eps log sigma(-beta d) ) / (1 - 2 eps)
    """
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
    flipped = -label_smoothing * F.logsigmoid(-beta * margin)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                  reward_shift: float) -> torch.Tensor:
    """BCO (pair form), Jung et al. 2024, "Binary Classifier Optimization" (arXiv 2404.04656): a
    binary classifier with logit r - delta, chosen answers labelled 1 and rejected ones 0:

        L = -log sigma(r_w - delta) - log sigma(-(r_l - delta))

    delta = reward_shift, the running mean of all training rewards so far (kept by
    preference_loss.RunningRewardMean). trl >= 1.0 computes this with delta = 0 (it dropped the shift that
    its first version, trl PR 1524, had): pass reward_shift=0 for that form.
    """
    return (-F.logsigmoid(beta * chosen_logratios - reward_shift)
            - F.logsigmoid(-(beta * rejected_logratios - reward_shift)))


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard labels, Wu et al. 2024 (arXiv 2405.00675), eq. 4.7 with P(y_w > y_l) = 1 for the winner:

        L = (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def _smoothed_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float) -> torch.Tensor:
    """AOT (paired), Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport"
    (arXiv 2406.05882): first-order stochastic dominance of the policy's over the reference's margins,
    enforced on the sorted batch (the 1-D optimal transport map):

        L_i = -(1 - eps) log sigma(beta delta_i) - eps log sigma(-beta delta_i),
        delta = sort_batch(log pi(y_w) - log pi(y_l)) - sort_batch(log pi_ref(y_w) - log pi_ref(y_l))

    L_i belongs to the i-th smallest margins, not to pair i: only the batch mean is meaningful.
    """
    logratios, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    return _smoothed_sigmoid(logratios - ref_logratios, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                      label_smoothing: float) -> torch.Tensor:
    """AOT (unpaired), Melnyk et al. 2024 (arXiv 2406.05882): dominance of the chosen log-ratios' distribution
    over the rejected ones', on the batch sorted separately:

        L_i = -(1 - eps) log sigma(beta delta_i) - eps log sigma(-beta delta_i),  delta = sort(u_w) - sort(u_l)
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen_sorted - rejected_sorted, beta, label_smoothing)


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, "Anchored Preference Optimization" (arXiv 2408.06266), eq. 7: for
    chosen answers better than the policy's own: raise y_w, lower y_l, each anchored at its reference:

        L = (1 - sigma(r_w)) + sigma(r_l)
    """
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), eq. 8: for chosen answers worse than the policy's
    own: lower both, the rejected one more:

        L = sigma(r_w) + (1 - sigma(r_w - r_l))
    """
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def discopop_loss(margin: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024 (arXiv 2406.08414), eq. 5, with rho = beta d:

        L = (1 - sigma(rho / tau)) * (-log sigma(rho)) + sigma(rho / tau) * exp(-rho)      (tau = 0.05 in the paper)
    """
    logits = margin * beta
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sft_loss(policy_chosen_token_sums: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen answers' negative log-likelihood per token over the batch (TRL's "sft"; with sigmoid it is
    RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733):

        L_i = -(sum_j log pi(y_w,j|x_j)) / (sum_j |y_w,j|)   for every pair i of the batch

    i.e. one value, the batch's mean token NLL, given to every pair (so the pairs' mean is that value).
    Takes the plain token sums, not LD-DPO's log-probs. Reference-free.
    """
    batch_loss = -policy_chosen_token_sums.sum() / chosen_lengths.sum().clamp(min=1.0)
    return batch_loss.expand(policy_chosen_token_sums.shape[0])


def sigmoid_norm_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, chosen_lengths: torch.Tensor,
                      rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """Length-normalised DPO (Tulu 3's "dpo_norm", Lambert et al. 2024, arXiv 2411.15124; SimPO's
    length argument, arXiv 2405.14734):

        L = -log sigma(beta (s_w/|y_w| - s_l/|y_l|))
    """
    margin = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
    return -F.logsigmoid(beta * margin)


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    """SimPO, Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward" (arXiv 2405.14734),
    with TRL CPOTrainer's label smoothing:

        z = beta (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma
        L = -(1 - eps) log sigma(z) - eps log sigma(-z)

    Reference-free: the implicit reward is beta log pi(y|x) / |y|. The paper's best settings put beta at
    2 to 10 and gamma/beta around 0.5.
    """
    logits = (policy_chosen_logps / chosen_lengths.clamp(min=1.0)
              - policy_rejected_logps / rejected_lengths.clamp(min=1.0))
    return _smoothed_sigmoid(logits - gamma / beta, beta, label_smoothing)
