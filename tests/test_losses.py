"""Unit tests for trainables/losses.py: hand-computed loss values, the DPO gradient, the KL terms.

Fast, CPU only, float64 where exact comparison matters. Run: `python -m pytest tests/test_losses.py -q`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.losses import (
    PREFERENCE_LOSSES,
    PreferenceLossOutput,
    conservative_dpo_loss,
    exact_token_kl,
    hinge_loss,
    ipo_loss,
    k2_token_kl,
    masked_token_mean,
    preference_loss_by_name,
    sigmoid_dpo_loss,
)

BETA = 0.5


def two_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pairs whose margins are easy by hand.

    pair 0: pc=-1, pr=-2, rc=-1.5, rr=-1.5 -> h = (-1+1.5) - (-2+1.5) = 0.5 + 0.5 = 1.0, beta*h = 0.5
    pair 1: pc=-3, pr=-1, rc=-2,   rr=-2   -> h = (-3+2)   - (-1+2)   = -1  - 1   = -2.0, beta*h = -1.0
    """
    policy_chosen = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    policy_rejected = torch.tensor([-2.0, -1.0], dtype=torch.float64)
    reference_chosen = torch.tensor([-1.5, -2.0], dtype=torch.float64)
    reference_rejected = torch.tensor([-1.5, -2.0], dtype=torch.float64)
    return policy_chosen, policy_rejected, reference_chosen, reference_rejected


def test_sigmoid_dpo_hand_values():
    """-log sigma(x) = log(1 + e^-x).
    pair 0: log(1 + e^-0.5) = log(1.606531) = 0.474077
    pair 1: log(1 + e^1)    = log(3.718282) = 1.313262
    """
    output = sigmoid_dpo_loss(*two_pairs(), BETA)
    expected = torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))], dtype=torch.float64)
    torch.testing.assert_close(output.losses, expected)
    hand_values = torch.tensor([0.474077, 1.313262], dtype=torch.float64)
    torch.testing.assert_close(output.losses, hand_values, atol=1e-6, rtol=0)


def test_ipo_hand_values():
    """target 1/(2 beta) = 1/(2*0.5) = 1.
    pair 0: (1 - 1)^2 = 0;  pair 1: (-2 - 1)^2 = 9.
    """
    output = ipo_loss(*two_pairs(), BETA)
    torch.testing.assert_close(output.losses, torch.tensor([0.0, 9.0], dtype=torch.float64))


def test_conservative_dpo_hand_values():
    """eps = 0.1: L = 0.9 * log(1 + e^-bh) + 0.1 * log(1 + e^bh).
    pair 0 (bh=0.5):  0.9*0.474077 + 0.1*0.974077 = 0.426669 + 0.097408 = 0.524077
    pair 1 (bh=-1):   0.9*1.313262 + 0.1*0.313262 = 1.181935 + 0.031326 = 1.213262
    """
    output = conservative_dpo_loss(*two_pairs(), BETA, label_smoothing=0.1)
    hand_values = torch.tensor([0.524077, 1.213262], dtype=torch.float64)
    torch.testing.assert_close(output.losses, hand_values, atol=1e-6, rtol=0)


def test_hinge_hand_values():
    """pair 0: max(0, 1 - 0.5) = 0.5;  pair 1: max(0, 1 - (-1)) = 2.
    A pair with beta*h >= 1 costs nothing: h = 4 -> max(0, 1 - 2) = 0.
    """
    output = hinge_loss(*two_pairs(), BETA)
    torch.testing.assert_close(output.losses, torch.tensor([0.5, 2.0], dtype=torch.float64))
    zero = torch.zeros(1, dtype=torch.float64)
    well_separated = hinge_loss(zero + 2.0, zero - 2.0, zero, zero, BETA)
    torch.testing.assert_close(well_separated.losses, zero)


@pytest.mark.parametrize("loss_name", sorted(PREFERENCE_LOSSES))
def test_rewards_are_detached_and_equal_beta_times_log_ratio(loss_name):
    """chosen: 0.5*(-1+1.5)=0.25, 0.5*(-3+2)=-0.5; rejected: 0.5*(-2+1.5)=-0.25, 0.5*(-1+2)=0.5."""
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = two_pairs()
    policy_chosen.requires_grad_(True)
    policy_rejected.requires_grad_(True)
    loss_fn = preference_loss_by_name(loss_name, label_smoothing=0.1 if loss_name == "cdpo" else 0.0)
    output = loss_fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected, BETA)
    assert isinstance(output, PreferenceLossOutput)
    assert output.losses.shape == (2,) and output.losses.requires_grad
    assert not output.chosen_rewards.requires_grad and not output.rejected_rewards.requires_grad
    torch.testing.assert_close(output.chosen_rewards, torch.tensor([0.25, -0.5], dtype=torch.float64))
    torch.testing.assert_close(output.rejected_rewards, torch.tensor([-0.25, 0.5], dtype=torch.float64))


def test_sigmoid_dpo_gradient_matches_closed_form():
    """Notes: dL/d log pi(y_w) = -beta sigma(r_l - r_w), dL/d log pi(y_l) = +beta sigma(r_l - r_w).
    pair 0: r_l - r_w = -0.25 - 0.25 = -0.5 -> sigma = 0.377541, so grads -0.188770 / +0.188770.
    """
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = (
        t.clone().requires_grad_(i < 2) for i, t in enumerate(two_pairs())
    )
    output = sigmoid_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, BETA)
    output.losses.sum().backward()
    weight = torch.sigmoid(output.rejected_rewards - output.chosen_rewards)  # (batch,)
    torch.testing.assert_close(policy_chosen.grad, -BETA * weight)
    torch.testing.assert_close(policy_rejected.grad, BETA * weight)
    assert policy_chosen.grad[0].item() == pytest.approx(-0.5 * 0.377541, abs=1e-6)


@pytest.mark.parametrize("loss_name", ["sigmoid", "cdpo"])
def test_policy_equal_to_reference_gives_ln2_and_zero_margin(loss_name):
    """h = 0 -> -log sigma(0) = ln 2 = 0.693147; cdpo: 0.9 ln2 + 0.1 ln2 = ln2."""
    logps = torch.tensor([-4.0, -7.5, -0.3], dtype=torch.float64)
    other = torch.tensor([-2.0, -9.0, -1.1], dtype=torch.float64)
    loss_fn = preference_loss_by_name(loss_name, label_smoothing=0.1 if loss_name == "cdpo" else 0.0)
    output = loss_fn(logps, other, logps.clone(), other.clone(), BETA)
    torch.testing.assert_close(output.losses, torch.full((3,), math.log(2.0), dtype=torch.float64))
    torch.testing.assert_close(output.chosen_rewards - output.rejected_rewards, torch.zeros(3, dtype=torch.float64))


def test_sigmoid_dpo_is_finite_for_huge_margins():
    """beta*h = +-1000: loss ~ 0 and ~ 1000, never inf/nan (logsigmoid, not log(sigmoid))."""
    zero = torch.zeros(2, dtype=torch.float64)
    policy_chosen = torch.tensor([1000.0, -1000.0], dtype=torch.float64)
    output = sigmoid_dpo_loss(policy_chosen, zero, zero, zero, 1.0)
    torch.testing.assert_close(output.losses, torch.tensor([0.0, 1000.0], dtype=torch.float64))


def test_cdpo_without_smoothing_equals_sigmoid():
    unsmoothed = conservative_dpo_loss(*two_pairs(), BETA, label_smoothing=0.0)
    torch.testing.assert_close(unsmoothed.losses, sigmoid_dpo_loss(*two_pairs(), BETA).losses)


def test_preference_loss_by_name_returns_the_variant_and_rejects_bad_settings():
    assert preference_loss_by_name("sigmoid") is sigmoid_dpo_loss
    assert preference_loss_by_name("hinge") is hinge_loss
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpo'.*\['cdpo', 'hinge', 'ipo', 'sigmoid'\]"):
        preference_loss_by_name("dpo")
    with pytest.raises(ValueError, match="cdpo.*label_smoothing"):
        preference_loss_by_name("cdpo")  # label_smoothing 0 would silently be plain DPO
    with pytest.raises(ValueError, match="only used by dpo.loss=cdpo"):
        preference_loss_by_name("ipo", label_smoothing=0.1)


def test_mismatched_shapes_are_reported():
    policy_chosen, policy_rejected, reference_chosen, _ = two_pairs()
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        sigmoid_dpo_loss(policy_chosen, policy_rejected, reference_chosen, torch.zeros(3), BETA)


def test_k2_hand_values_mask_and_sign():
    """k2 = d^2 / 2, d = policy - ref.
    (0,0): d = -1.0 - (-0.5) = -0.5 -> 0.125
    (0,1): d = -0.5 - (-1.0) = 0.5  -> 0.125 (symmetric in the sign of d)
    (0,2): masked out (and garbage reference -1e4 must not leak) -> 0
    (1,0): d = -0.7 - (-30.7) = 30  -> 450 (finite where k3 = e^-30 + 30 - 1 would be 29 and e^30 the other way)
    (1,1..2): policy == reference -> 0
    """
    policy = torch.tensor([[-1.0, -0.5, -2.0], [-0.7, -3.0, -0.1]], dtype=torch.float64)
    reference = torch.tensor([[-0.5, -1.0, -1e4], [-30.7, -3.0, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kl = k2_token_kl(policy, reference, mask)
    expected = torch.tensor([[0.125, 0.125, 0.0], [450.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(kl, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(k2_token_kl(policy, reference, mask.double()), kl)


def test_k2_stays_finite_where_the_policy_pushes_a_token_far_below_the_reference():
    """d = -200 nats: k3 = exp(200) - ... overflows float32 to inf; k2 = 20000 and its gradient d = -200."""
    policy = torch.tensor([[-200.0]], requires_grad=True)
    kl = k2_token_kl(policy, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert kl.item() == 20000.0
    kl.sum().backward()
    assert policy.grad.item() == -200.0


def test_k2_is_never_negative_and_its_gradient_is_finite():
    generator = torch.Generator().manual_seed(0)
    policy = (torch.randn(8, 16, generator=generator) * 3).requires_grad_(True)
    reference = policy.detach() + torch.randn(8, 16, generator=generator) * 1e-4
    mask = torch.rand(8, 16, generator=generator) > 0.3
    kl = k2_token_kl(policy, reference, mask)
    assert (kl >= 0).all()
    assert (kl[~mask] == 0).all()
    kl.sum().backward()
    assert torch.isfinite(policy.grad).all()


def random_logits(generator: torch.Generator, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 2


def test_exact_kl_matches_torch_distributions_and_kl_div():
    generator = torch.Generator().manual_seed(1)
    policy_logits = random_logits(generator, (3, 5, 11))  # (sequences, seq_len, vocab)
    reference_logits = random_logits(generator, (3, 5, 11))
    mask = torch.ones(3, 5)
    mask[0, :2] = 0
    kl = exact_token_kl(policy_logits, reference_logits, mask)
    from_distributions = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=policy_logits), torch.distributions.Categorical(logits=reference_logits)
    )  # (3, 5)
    from_kl_div = F.kl_div(
        F.log_softmax(reference_logits, -1), F.log_softmax(policy_logits, -1), reduction="none", log_target=True
    ).sum(-1)  # (3, 5); kl_div(input=log q, target=log p) = sum p (log p - log q)
    torch.testing.assert_close(kl, (from_distributions * mask).float())
    torch.testing.assert_close(kl, (from_kl_div * mask).float())
    assert kl.dtype == torch.float32
    assert (kl[0, :2] == 0).all() and (kl[mask.bool()] > 0).all()


def test_exact_kl_is_zero_for_identical_logits_in_bfloat16():
    logits = random_logits(torch.Generator().manual_seed(2), (2, 4, 9)).to(torch.bfloat16)
    kl = exact_token_kl(logits, logits.clone(), torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(kl, torch.zeros(2, 4))


def test_exact_kl_chunking_gives_identical_values_and_gradients():
    generator = torch.Generator().manual_seed(3)
    reference_logits = random_logits(generator, (2, 7, 13)).float()
    base_logits = random_logits(generator, (2, 7, 13)).float()
    mask = torch.rand(2, 7, generator=generator) > 0.2
    results = []
    for chunk_size in (1, 3, 1024):  # 1 and 3 split the 7 positions unevenly; 1024 is one chunk
        policy_logits = base_logits.clone().requires_grad_(True)
        kl = exact_token_kl(policy_logits, reference_logits, mask, chunk_size=chunk_size)
        masked_token_mean(kl, mask).backward()
        results.append((kl.detach(), policy_logits.grad))
    for kl, grad in results[:-1]:
        torch.testing.assert_close(kl, results[-1][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, results[-1][1], rtol=0, atol=1e-6)
    # The checkpointed gradient equals autograd through the plain torch.distributions formula.
    plain_policy = base_logits.clone().requires_grad_(True)
    plain_kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=plain_policy), torch.distributions.Categorical(logits=reference_logits)
    )
    (plain_kl * mask).sum().div(mask.sum()).backward()
    torch.testing.assert_close(results[0][1], plain_policy.grad, rtol=1e-4, atol=1e-6)


def test_masked_token_mean_uses_mask_or_global_count():
    """values 1..6, mask keeps 1, 2, 6 -> sum 9; local mean 9/3 = 3; with global count 6 -> 1.5."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_token_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_token_mean(values, mask, token_count=6).item() == pytest.approx(1.5)
    assert masked_token_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="token_count must be > 0"):
        masked_token_mean(values, mask, token_count=0)


# --- the loss family (trainables/loss_family.py, preference_loss.py, loss_options.py): hand arithmetic ---

from trainables import loss_family  # noqa: E402
from trainables.loss_options import LOSS_NAMES, REFERENCE_FREE_LOSSES, LossSpec, check_loss_spec  # noqa: E402
from trainables.preference_loss import (  # noqa: E402
    PairLogps,
    RunningRewardMean,
    build_preference_loss,
    loss_at_zero_log_ratio,
    pair_logps_from_tokens,
)


def nls(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x), by hand."""
    return math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def spec(*names: str, weights=None, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5, use_weighting=False,
         ld_alpha=None, simpo_gamma=0.25, discopop_tau=0.05) -> LossSpec:
    return LossSpec(names=names, weights=tuple(weights or [1.0] * len(names)), label_smoothing=label_smoothing,
                    f_divergence=f_divergence, f_alpha=f_alpha, use_weighting=use_weighting, ld_alpha=ld_alpha,
                    simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)


def two_pair_batch(**extra) -> PairLogps:
    """two_pairs() with answer lengths |y_w| = 2, 4 and |y_l| = 1, 2. With beta = 0.5:
    u_w = (0.5, -1), u_l = (-0.5, 1), d = u_w - u_l = (1, -2), beta d = (0.5, -1),
    r_w = (0.25, -0.5), r_l = (-0.25, 0.5).
    """
    pc, pr, rc, rr = two_pairs()
    lengths = dict(chosen_lengths=torch.tensor([2.0, 4.0], dtype=torch.float64),
                   rejected_lengths=torch.tensor([1.0, 2.0], dtype=torch.float64))
    return PairLogps(pc, pr, rc, rr, **{**lengths, **extra})


def family_losses(loss_spec: LossSpec, batch: PairLogps | None = None) -> torch.Tensor:
    return build_preference_loss(loss_spec)(batch or two_pair_batch(), BETA, update_state=True).losses


R_W, R_L = (0.25, -0.5), (-0.25, 0.5)  # rewards of two_pair_batch
HAND_VALUES = {
    "sigmoid": [nls(0.5), nls(-1.0)],
    "cdpo": [0.9 * nls(0.5) + 0.1 * nls(-0.5), 0.9 * nls(-1.0) + 0.1 * nls(1.0)],  # eps 0.1
    "hinge": [1 - 0.5, 1 - (-1.0)],
    # per-token margins: 0.5/2 - (-0.5)/1 = 0.75 and -1/4 - 1/2 = -0.75; target 1/(2*0.5) = 1
    "ipo": [(0.75 - 1) ** 2, (-0.75 - 1) ** 2],
    # eps = 0.001: q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps), q_w = sigma(beta d)
    "exo_pair": [sig(bd) * (-nls(bd) - math.log(0.999)) + sig(-bd) * (-nls(-bd) - math.log(0.001)) for bd in (0.5, -1.0)],
    "nca_pair": [nls(rw) + 0.5 * nls(-rw) + 0.5 * nls(-rl) for rw, rl in zip(R_W, R_L)],
    "robust": [(0.9 * nls(bd) - 0.1 * nls(-bd)) / 0.8 for bd in (0.5, -1.0)],  # eps 0.1
    # fresh state: delta = mean(0.25, -0.5, -0.25, 0.5) = 0
    "bco_pair": [nls(rw) + nls(-rl) for rw, rl in zip(R_W, R_L)],
    "sppo_hard": [(0.5 - 1) ** 2 + (-0.5 + 1) ** 2, (-1 - 1) ** 2 + (1 + 1) ** 2],  # 1/(2 beta) = 1
    # sorted policy margins pc - pr = (1, -2) -> (-2, 1); reference margins (0, 0); beta delta = (-1, 0.5)
    "aot": [nls(-1.0), nls(0.5)],
    # sort(u_w) = (-1, 0.5), sort(u_l) = (-0.5, 1): delta = (-0.5, -0.5), beta delta = -0.25
    "aot_unpaired": [nls(-0.25), nls(-0.25)],
    "apo_zero": [(1 - sig(rw)) + sig(rl) for rw, rl in zip(R_W, R_L)],
    "apo_down": [sig(rw) + (1 - sig(rw - rl)) for rw, rl in zip(R_W, R_L)],
    # rho = beta d; (1 - sigma(rho/0.05)) (-log sigma(rho)) + sigma(rho/0.05) e^-rho
    "discopop": [(1 - sig(rho / 0.05)) * nls(rho) + sig(rho / 0.05) * math.exp(-rho) for rho in (0.5, -1.0)],
    # -(pc_0 + pc_1) / (|y_w,0| + |y_w,1|) = -(-1 - 3) / (2 + 4) for both pairs
    "sft": [4 / 6, 4 / 6],
    "sigmoid_norm": [nls(0.5 * 0.75), nls(0.5 * -0.75)],
    # averages pc/|y_w| = (-0.5, -0.75), pr/|y_l| = (-2, -0.5); z = 0.5 (1.5, -0.25) - 0.25 = (0.5, -0.375)
    "simpo": [nls(0.5), nls(-0.375)],
}
HAND_SMOOTHING = {"cdpo": 0.1, "robust": 0.1, "exo_pair": 0.001}


def test_hand_values_cover_every_name():
    assert set(HAND_VALUES) == set(LOSS_NAMES)


@pytest.mark.parametrize("name", sorted(HAND_VALUES))
def test_family_hand_values(name):
    losses = family_losses(spec(name, label_smoothing=HAND_SMOOTHING.get(name, 0.0)))
    torch.testing.assert_close(losses, torch.tensor(HAND_VALUES[name], dtype=torch.float64))


def test_family_agrees_with_the_classic_functions():
    batch = two_pair_batch()
    classic = (batch.policy_chosen, batch.policy_rejected, batch.reference_chosen, batch.reference_rejected, BETA)
    torch.testing.assert_close(family_losses(spec("sigmoid")), sigmoid_dpo_loss(*classic).losses)
    torch.testing.assert_close(family_losses(spec("hinge")), hinge_loss(*classic).losses)
    torch.testing.assert_close(family_losses(spec("cdpo", label_smoothing=0.1)),
                               conservative_dpo_loss(*classic, label_smoothing=0.1).losses)


def test_rewards_are_beta_log_ratios_and_simpos_are_length_averaged():
    """Reference losses: r = beta u = (0.25, -0.5) and (-0.25, 0.5); SimPO: beta pc/|y_w| = 0.5 (-0.5, -0.75)."""
    out = build_preference_loss(spec("nca_pair"))(two_pair_batch(), BETA, update_state=True)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(R_W, dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(R_L, dtype=torch.float64))
    simpo = build_preference_loss(spec("simpo"))(two_pair_batch(), BETA, update_state=True)
    torch.testing.assert_close(simpo.chosen_rewards, torch.tensor([-0.25, -0.375], dtype=torch.float64))
    torch.testing.assert_close(simpo.rejected_rewards, torch.tensor([-1.0, -0.25], dtype=torch.float64))
    assert not simpo.chosen_rewards.requires_grad


def test_simpo_ignores_the_reference_and_smooths_its_labels():
    """SimPO reads no reference: other reference log-probs give the same loss. eps = 0.2:
    0.8 (-log sigma(z)) + 0.2 (-log sigma(-z)), z = (0.5, -0.375)."""
    batch = two_pair_batch()
    moved = PairLogps(batch.policy_chosen, batch.policy_rejected, batch.reference_chosen + 7, batch.reference_rejected - 3,
                      batch.chosen_lengths, batch.rejected_lengths)
    torch.testing.assert_close(family_losses(spec("simpo"), moved), family_losses(spec("simpo")))
    expected = [0.8 * nls(z) + 0.2 * nls(-z) for z in (0.5, -0.375)]
    torch.testing.assert_close(family_losses(spec("simpo", label_smoothing=0.2)), torch.tensor(expected, dtype=torch.float64))


def test_f_divergence_scores_by_hand():
    """u = (0.5, -1): forward_kl 1 - e^-u; js log 2 + log sigma(u); alpha (a = 0.5): (e^(-0.5 u) - 1) / -0.5."""
    u = torch.tensor([0.5, -1.0], dtype=torch.float64)
    cases = {
        ("forward_kl", 0.5): [1 - math.exp(-0.5), 1 - math.exp(1.0)],
        ("js_divergence", 0.5): [math.log(2) - nls(0.5), math.log(2) - nls(-1.0)],
        ("alpha_divergence", 0.5): [(math.exp(-0.25) - 1) / -0.5, (math.exp(0.5) - 1) / -0.5],
        ("alpha_divergence", 1.0): [0.5, -1.0],  # the limit a -> 1 is reverse KL
        ("reverse_kl", 0.5): [0.5, -1.0],
    }
    for (name, alpha), expected in cases.items():
        torch.testing.assert_close(loss_family.f_divergence_scores(u, name, alpha),
                                   torch.tensor(expected, dtype=torch.float64))


def test_sigmoid_with_forward_kl_by_hand():
    """s = 1 - e^-u: s_w = (1 - e^-0.5, 1 - e^1), s_l = (1 - e^0.5, 1 - e^-1); L = -log sigma(beta (s_w - s_l))."""
    d = [(1 - math.exp(-0.5)) - (1 - math.exp(0.5)), (1 - math.exp(1.0)) - (1 - math.exp(-1.0))]
    torch.testing.assert_close(family_losses(spec("sigmoid", f_divergence="forward_kl")),
                               torch.tensor([nls(0.5 * d[0]), nls(0.5 * d[1])], dtype=torch.float64))


def test_ld_dpo_logps_by_hand():
    """Pair 0: chosen answer 3 tokens (-1, -2, -4), rejected 2 tokens (-1, -1): public length 2.
    chosen: (-1 - 2) + 0.5 * (-4) = -5; rejected: -2 + 0.5 * 0 = -2. Pair 1: chosen 1 token (-3) after
    one prompt position, rejected 1 token (-5): public length 1, nothing beyond it: -3 and -5.
    Prompt positions hold garbage (-100) that must not count."""
    token_logps = torch.tensor([[-100.0, -1.0, -2.0, -4.0],   # chosen 0
                                [-100.0, -3.0, 0.0, 0.0],     # chosen 1
                                [-100.0, -1.0, -1.0, 0.0],    # rejected 0
                                [-100.0, -100.0, -5.0, 0.0]], dtype=torch.float64)  # rejected 1
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]])
    torch.testing.assert_close(loss_family.ld_dpo_logps(token_logps, mask, 0.5),
                               torch.tensor([-5.0, -3.0, -2.0, -5.0], dtype=torch.float64))
    torch.testing.assert_close(loss_family.ld_dpo_logps(token_logps, mask, 1.0),
                               torch.tensor([-7.0, -3.0, -2.0, -5.0], dtype=torch.float64))  # plain sums
    pairs = pair_logps_from_tokens(token_logps, torch.zeros_like(token_logps), mask, ld_alpha=0.0)
    torch.testing.assert_close(pairs.policy_chosen, torch.tensor([-3.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(pairs.policy_chosen_token_sums, torch.tensor([-7.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(pairs.chosen_lengths, torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(pairs.rejected_lengths, torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_wpo_weights_and_weighted_loss_by_hand():
    """w = exp(mean over answer tokens of (log p - log sum p^2)).
    row 0: tokens (-1, -2), log sum p^2 (-0.5, -1): mean((-0.5, -1)) = -0.75 -> e^-0.75
    row 1: token (-0.2), log sum p^2 (-0.4): 0.2 -> e^0.2. The pair's sigmoid loss is multiplied by both."""
    token_logps = torch.tensor([[-1.0, -2.0], [-0.2, -9.0]], dtype=torch.float64)
    log_sum_sq = torch.tensor([[-0.5, -1.0], [-0.4, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(loss_family.wpo_weights(token_logps, log_sum_sq, mask),
                               torch.tensor([math.exp(-0.75), math.exp(0.2)], dtype=torch.float64))
    pairs = pair_logps_from_tokens(token_logps, None, mask, ld_alpha=None, log_sum_sq_probs=log_sum_sq)
    # reference-free: h = -3 - (-0.2) = -2.8
    losses = family_losses(spec("sigmoid", use_weighting=True), pairs)
    torch.testing.assert_close(losses, torch.tensor([nls(0.5 * -2.8) * math.exp(-0.75 + 0.2)], dtype=torch.float64))


def test_log_sum_squared_probs_matches_its_definition():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4): sum p^2 = 10/16
    torch.testing.assert_close(loss_family.log_sum_squared_probs(logits), torch.tensor([math.log(10 / 16)]))


def test_weighted_sum_is_rpo_by_hand():
    """sigmoid + 0.5 sft: (nls(0.5), nls(-1)) + 0.5 * 4/6."""
    losses = family_losses(spec("sigmoid", "sft", weights=[1.0, 0.5]))
    torch.testing.assert_close(losses, torch.tensor([nls(0.5) + 0.5 * 4 / 6, nls(-1.0) + 0.5 * 4 / 6],
                                                    dtype=torch.float64))


def bco_batch(chosen_logratios, rejected_logratios) -> PairLogps:
    chosen = torch.tensor(chosen_logratios, dtype=torch.float64)
    rejected = torch.tensor(rejected_logratios, dtype=torch.float64)
    return PairLogps(chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(rejected))


def test_bco_running_mean_across_steps_eval_and_resume():
    """beta 0.5. Step 1: u_w = (2, 4), u_l = (0, -2): rewards (1, 2, 0, -1), delta = 2/4 = 0.5.
    Step 2: u_w = (6,), u_l = (2,): rewards (3, 1): delta = (2 + 4) / 6 = 1.
    An evaluation call reads delta without changing it; a restored copy continues identically."""
    loss = build_preference_loss(spec("bco_pair"))
    step1 = loss(bco_batch([2.0, 4.0], [0.0, -2.0]), BETA, update_state=True)
    torch.testing.assert_close(step1.losses, torch.tensor([nls(1 - 0.5) + nls(-(0 - 0.5)), nls(2 - 0.5) + nls(-(-1 - 0.5))],
                                                          dtype=torch.float64))
    assert loss.state_dict() == {"bco_pair": {"reward_sum": 2.0, "reward_count": 4.0}}
    evaluation = loss(bco_batch([10.0], [10.0]), BETA, update_state=False)
    torch.testing.assert_close(evaluation.losses, torch.tensor([nls(5 - 0.5) + nls(-(5 - 0.5))], dtype=torch.float64))
    assert loss.state_dict() == {"bco_pair": {"reward_sum": 2.0, "reward_count": 4.0}}
    resumed = build_preference_loss(spec("bco_pair"))
    resumed.load_state_dict(loss.state_dict())
    step2 = loss(bco_batch([6.0], [2.0]), BETA, update_state=True)
    torch.testing.assert_close(step2.losses, torch.tensor([nls(3 - 1.0) + nls(-(1 - 1.0))], dtype=torch.float64))
    torch.testing.assert_close(resumed(bco_batch([6.0], [2.0]), BETA, update_state=True).losses, step2.losses)
    assert resumed.state_dict() == loss.state_dict() == {"bco_pair": {"reward_sum": 6.0, "reward_count": 6.0}}


def test_loss_state_round_trip_is_checked():
    assert build_preference_loss(spec("sigmoid")).state_dict() == {}
    build_preference_loss(spec("sigmoid")).load_state_dict({})
    with pytest.raises(ValueError, match="expected \\['bco_pair'\\]"):
        build_preference_loss(spec("sigmoid", "bco_pair")).load_state_dict({})
    assert RunningRewardMean().mean == 0.0


def _bco_rank(rank: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss = build_preference_loss(spec("bco_pair"))
        chosen, rejected = [[2.0, 4.0], [1.0, 3.0]][rank], [[0.0, -2.0], [5.0, -1.0]][rank]
        first = loss(bco_batch(chosen, rejected), BETA, update_state=True).losses
        second = loss(bco_batch([chosen[0]], [rejected[0]]), BETA, update_state=True).losses
        torch.save({"first": first, "second": second, "state": loss.state_dict()}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bco_running_mean_is_all_reduced_over_ranks(tmp_path):
    """Two gloo ranks, each with half of a batch, see the delta of the whole batch, and the same state after.
    rewards: rank 0 (1, 2, 0, -1), rank 1 (0.5, 1.5, 2.5, -0.5): delta = 6/8 = 0.75 on both ranks;
    second step adds rank 0's (1, 0) and rank 1's (0.5, 2.5): delta = (6 + 4) / 12."""
    import torch.multiprocessing as mp

    mp.spawn(_bco_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0]["state"] == results[1]["state"] == {"bco_pair": {"reward_sum": 10.0, "reward_count": 12.0}}
    torch.testing.assert_close(results[0]["first"], torch.tensor([nls(1 - 0.75) + nls(-(0 - 0.75)),
                                                                  nls(2 - 0.75) + nls(-(-1 - 0.75))], dtype=torch.float64))
    torch.testing.assert_close(results[1]["second"], torch.tensor([nls(0.5 - 10 / 12) + nls(-(2.5 - 10 / 12))],
                                                                  dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(set(LOSS_NAMES) - REFERENCE_FREE_LOSSES))
def test_loss_at_zero_log_ratio(name):
    """Every log-ratio 0 (d = r = 0): beta = 0.5."""
    eps = {"cdpo": 0.1, "robust": 0.1, "exo_pair": 0.001, "aot": 0.1, "aot_unpaired": 0.1}.get(name, 0.0)
    ln2 = math.log(2)
    expected = {
        "sigmoid": ln2, "cdpo": ln2, "robust": ln2, "aot": ln2, "aot_unpaired": ln2, "sigmoid_norm": ln2,
        "hinge": 1.0, "ipo": 1.0, "sppo_hard": 2.0,  # (0 - 1)^2; (0 - 1)^2 + (0 + 1)^2
        "nca_pair": 2 * ln2, "bco_pair": 2 * ln2, "apo_zero": 1.0, "apo_down": 1.0,
        "exo_pair": 0.5 * (-ln2 - math.log(0.999)) + 0.5 * (-ln2 - math.log(0.001)),
        "discopop": 0.5 * ln2 + 0.5,  # sigma(0) = 1/2 of each component
    }[name]
    assert loss_at_zero_log_ratio(spec(name, label_smoothing=eps), BETA) == pytest.approx(expected, abs=1e-12)
    assert loss_at_zero_log_ratio(spec(name, "sft", label_smoothing=eps), BETA) is None


def test_spec_requirements():
    assert not spec("simpo").needs_reference and not spec("sft").needs_reference and spec("sigmoid", "sft").needs_reference
    assert spec("sft").needs_lengths and spec("ipo").needs_lengths and not spec("sigmoid").needs_lengths
    assert spec("sigmoid", ld_alpha=0.5).needs_token_logps and not spec("sigmoid").needs_token_logps
    assert spec("bco_pair").stateful and not spec("sigmoid").stateful
    assert spec("simpo").length_normalized and not spec("simpo", "sft").length_normalized


@pytest.mark.parametrize("bad, message", [
    (spec("dpo"), r"unknown preference loss 'dpo'"),
    (spec(), r"at least one loss name"),
    (spec("sigmoid", "sigmoid"), r"each name may appear once"),
    (LossSpec(("sigmoid", "sft"), (1.0,), 0.0, "reverse_kl", 0.5, False, None, 0.0, 0.05), r"dpo.loss_weights: one weight"),
    (spec("sigmoid", "sft", weights=[1.0, 0.0]), r"finite number > 0"),
    (spec("simpo", "sigmoid"), r"combine it only with sft"),
    (spec("cdpo"), r"loss 'cdpo' needs label_smoothing in \(0.0, 0.5\)"),
    (spec("exo_pair"), r"exo_pair.*1e-3"),
    (spec("robust", label_smoothing=0.5), r"loss 'robust' needs label_smoothing in \[0.0, 0.5\)"),
    (spec("nca_pair", label_smoothing=0.1), r"only used by dpo.loss=cdpo, robust"),
    (spec("sigmoid", f_divergence="kl"), r"dpo.f_divergence: unknown"),
    (spec("nca_pair", f_divergence="js_divergence"), r"not to \['nca_pair'\]"),
    (spec("simpo", f_divergence="forward_kl"), r"not to \['simpo'\]"),
    (spec("sigmoid", f_divergence="alpha_divergence", f_alpha=float("nan")), r"dpo.f_alpha"),
    (spec("aot", use_weighting=True), r"dpo.use_weighting.*\['aot'\]"),
    (spec("sigmoid", ld_alpha=1.5), r"dpo.ld_alpha: must be in \[0, 1\]"),
    (spec("simpo", simpo_gamma=-1.0), r"dpo.simpo_gamma"),
    (spec("discopop", discopop_tau=0.0), r"dpo.discopop_tau"),
])
def test_check_loss_spec_refuses(bad, message):
    with pytest.raises(ValueError, match=message):
        check_loss_spec(bad)
    with pytest.raises(ValueError, match=message):
        build_preference_loss(bad)


def test_missing_inputs_and_bad_beta_are_reported():
    batch = two_pair_batch()
    bare = PairLogps(batch.policy_chosen, batch.policy_rejected, batch.reference_chosen, batch.reference_rejected)
    with pytest.raises(ValueError, match="needs PairLogps.chosen_lengths, rejected_lengths"):
        build_preference_loss(spec("ipo"))(bare, BETA, update_state=True)
    with pytest.raises(ValueError, match="needs PairLogps.chosen_weights, rejected_weights"):
        build_preference_loss(spec("sigmoid", use_weighting=True))(bare, BETA, update_state=True)
    with pytest.raises(ValueError, match="policy_chosen_token_sums"):
        build_preference_loss(spec("sigmoid", "sft", ld_alpha=0.5))(batch, BETA, update_state=True)
    with pytest.raises(ValueError, match="one shape"):
        build_preference_loss(spec("sigmoid"))(PairLogps(batch.policy_chosen, batch.policy_rejected[:1],
                                                         batch.reference_chosen, batch.reference_rejected),
                                               BETA, update_state=True)
    with pytest.raises(ValueError, match="beta > 0"):
        build_preference_loss(spec("sigmoid"))(batch, 0.0, update_state=True)


def test_preference_loss_by_name_points_family_names_to_the_builder():
    with pytest.raises(ValueError, match="build_preference_loss"):
        preference_loss_by_name("nca_pair")
