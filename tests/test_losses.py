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
    k3_token_kl,
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
    with pytest.raises(ValueError, match="only applies to loss 'cdpo'"):
        preference_loss_by_name("ipo", label_smoothing=0.1)


def test_mismatched_shapes_are_reported():
    policy_chosen, policy_rejected, reference_chosen, _ = two_pairs()
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        sigmoid_dpo_loss(policy_chosen, policy_rejected, reference_chosen, torch.zeros(3), BETA)


def test_k3_hand_values_mask_and_sign():
    """k3 = e^d - d - 1, d = ref - policy.
    (0,0): d = -0.5 - (-1.0) = 0.5  -> 1.648721 - 0.5 - 1 = 0.148721
    (0,1): d = -1.0 - (-0.5) = -0.5 -> 0.606531 + 0.5 - 1 = 0.106531
    (0,2): masked out (and garbage reference -1e4 must not leak) -> 0
    (1,*): policy == reference -> 0
    """
    policy = torch.tensor([[-1.0, -0.5, -2.0], [-0.7, -3.0, -0.1]], dtype=torch.float64)
    reference = torch.tensor([[-0.5, -1.0, -1e4], [-0.7, -3.0, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kl = k3_token_kl(policy, reference, mask)
    expected = torch.tensor([[0.148721, 0.106531, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(kl, expected, atol=1e-6, rtol=0)
    float_mask_kl = k3_token_kl(policy, reference, mask.double())
    torch.testing.assert_close(float_mask_kl, kl)


def test_k3_is_never_negative_and_its_gradient_is_finite():
    generator = torch.Generator().manual_seed(0)
    policy = (torch.randn(8, 16, generator=generator) * 3).requires_grad_(True)
    reference = policy.detach() + torch.randn(8, 16, generator=generator) * 1e-4
    mask = torch.rand(8, 16, generator=generator) > 0.3
    kl = k3_token_kl(policy, reference, mask)
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
