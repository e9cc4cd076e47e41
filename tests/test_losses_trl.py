"""The loss family against TRL's own code: same random log-probs, losses, rewards and gradients within 1e-6.

TRL's DPOTrainer computes its losses inside `_compute_loss(model, inputs)`, after a model call. Here that
method runs unbound on a stand-in trainer (only the attributes it reads) and a stand-in model whose
"fused LM head" output is a leaf tensor of per-token log-probs, zero outside the answers as TRL's head
makes it. The reference log-probs go in precomputed, from TRL's own `compute_ref_log_probs` (so LD-DPO's
reference side is TRL's too). TRL returns only the mean loss; its per-pair losses and rewards are read
from `_compute_loss`'s locals when it returns (a profile hook). SimPO is checked against
`CPOTrainer.cpo_loss`. trl is in the `test` extra (pinned to 1.16.*), so these run in CI; skipped only
where trl is not installed.

Run: `python -m pytest tests/test_losses_trl.py -q`.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

try:
    from trl.trainer.dpo_trainer import DPOTrainer
except ImportError as error:  # not installed (it is in the test extra), or broken
    pytest.skip(f"trl is not importable: {error}", allow_module_level=True)

from trainables.loss_options import (  # noqa: E402
    F_DIVERGENCE_LOSSES,
    NO_WEIGHTING_LOSSES,
    TRL_LOSS_NAMES,
    LossSpec,
)
from trainables.losses import hinge_loss, ipo_loss, sigmoid_dpo_loss  # noqa: E402
from trainables.preference_loss import build_preference_loss, pair_logps_from_tokens  # noqa: E402

if not hasattr(DPOTrainer, "_compute_loss"):
    pytest.skip("these checks follow trl >= 1.0's DPOTrainer._compute_loss", allow_module_level=True)

BETA = 0.7
PAIRS, POSITIONS = 6, 12
TOLERANCE = dict(atol=1e-6, rtol=0)
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1, "cdpo": 0.15, "simpo": 0.1}


def make_batch(seed: int, dtype: torch.dtype = torch.float64) -> SimpleNamespace:
    """2B rows [chosen; rejected] of POSITIONS + 1 tokens: a prompt (>= 1 token), an answer, padding.

    Chosen and rejected answers have different lengths (LD-DPO's public length matters). Reference token
    log-probs are the policy's plus noise, so log-ratios stay O(1) and float32 keeps 1e-6.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * PAIRS
    completion_mask = torch.zeros(rows, POSITIONS + 1, dtype=torch.long)
    for row in range(rows):
        prompt = int(torch.randint(1, 4, (1,), generator=generator))
        length = int(torch.randint(1, POSITIONS + 1 - prompt, (1,), generator=generator))
        completion_mask[row, prompt : prompt + length] = 1
    answer_mask = completion_mask[:, 1:].bool()  # (2B, POSITIONS), aligned with the predicted tokens
    policy = -3 * torch.rand(rows, POSITIONS, generator=generator, dtype=torch.float64)
    reference = policy + 0.4 * torch.randn(rows, POSITIONS, generator=generator, dtype=torch.float64)
    log_sum_sq = -0.2 - 2 * torch.rand(rows, POSITIONS, generator=generator, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    return SimpleNamespace(
        completion_mask=completion_mask,
        answer_mask=answer_mask,
        input_ids=torch.randint(0, 50, (rows, POSITIONS + 1), generator=generator),
        policy=torch.where(answer_mask, policy, zero).to(dtype),
        reference=torch.where(answer_mask, reference, zero).to(dtype),
        log_sum_sq=torch.where(answer_mask, log_sum_sq, zero).to(dtype),
    )


def spec_of(names, weights=None, *, f_divergence="reverse_kl", f_alpha=0.5, use_weighting=False, ld_alpha=None,
            label_smoothing=None, simpo_gamma=0.6, discopop_tau=0.05) -> LossSpec:
    names = tuple(names)
    if label_smoothing is None:
        label_smoothing = max((SMOOTHING.get(name, 0.0) for name in names), default=0.0)
    return LossSpec(names=names, weights=tuple(weights or [1.0] * len(names)), label_smoothing=label_smoothing,
                    f_divergence=f_divergence, f_alpha=f_alpha, use_weighting=use_weighting, ld_alpha=ld_alpha,
                    simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)


class StandInAccelerator:
    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def gather_for_metrics(self, value):
        return value

    def gather(self, value):
        return value

    def autocast(self):
        return contextlib.nullcontext()


def stand_in_model(token_logps: torch.Tensor, mask: torch.Tensor, log_sum_sq: torch.Tensor):
    """A callable returning what TRL's fused LM head returns: per-token values, zero (and no gradient) off the mask."""
    def forward(**kwargs):
        assert kwargs["fused_lm_head"] is True
        return SimpleNamespace(
            log_probs=token_logps.masked_fill(~mask, 0),
            entropy=torch.zeros_like(token_logps),
            mean_logits=torch.zeros_like(token_logps),
            is_top1=torch.zeros(mask.shape, dtype=torch.bool),
            log_sum_sq_probs=log_sum_sq.masked_fill(~mask, 0),
        )
    return forward


def stand_in_trainer(spec: LossSpec, beta: float) -> SimpleNamespace:
    policy_module = torch.nn.Module()  # in training mode, not a PEFT model, no gradient checkpointing
    policy_module.is_gradient_checkpointing = False
    return SimpleNamespace(
        model=policy_module, ref_model=None,
        accelerator=StandInAccelerator(), precompute_ref_logps=True, beta=beta, loss_types=list(spec.names),
        loss_weights=list(spec.weights), ld_alpha=spec.ld_alpha, f_divergence_type=spec.f_divergence,
        f_alpha_divergence_coef=spec.f_alpha, label_smoothing=spec.label_smoothing, use_weighting=spec.use_weighting,
        args=SimpleNamespace(discopop_tau=spec.discopop_tau, gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )


def run_trl(spec: LossSpec, beta: float, batch: SimpleNamespace, policy_leaf: torch.Tensor, rows=None,
            reference_shift: float = 0.0) -> SimpleNamespace:
    """TRL's loss on `batch` (rows permuted by `rows`, e.g. chosen and rejected swapped), differentiable in
    policy_leaf; reference_shift is added to both reference log-probs (bco_pair's delta / beta).

    Returns the mean loss and `_compute_loss`'s locals at its return: per_pair (the last loss type's
    per-pair values, still attached to the graph), the rewards, and the WPO weights (None without them).
    A RuntimeError inside TRL is returned as `error`, with the locals it had reached.
    """
    rows = torch.arange(2 * PAIRS) if rows is None else rows
    mask, completion_mask = batch.answer_mask[rows], batch.completion_mask[rows]
    trainer = stand_in_trainer(spec, beta)
    inputs = {"input_ids": batch.input_ids[rows], "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask}
    reference_model = stand_in_model(batch.reference[rows], mask, batch.log_sum_sq[rows])
    ref_chosen, ref_rejected = DPOTrainer.compute_ref_log_probs(trainer, reference_model, inputs)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_chosen + reference_shift, ref_rejected + reference_shift
    captured: dict[str, torch.Tensor | None] = {}
    code = DPOTrainer._compute_loss.__code__

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            for name in ("per_sequence_loss", "chosen_rewards", "rejected_rewards", "chosen_weights",
                         "rejected_weights"):
                captured[name] = frame.f_locals.get(name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    loss, error = None, None
    try:
        loss = DPOTrainer._compute_loss(trainer, stand_in_model(policy_leaf[rows], mask, batch.log_sum_sq[rows]),
                                        inputs, False)
    except RuntimeError as raised:
        error = raised
    finally:
        sys.setprofile(previous)
    weights = captured["chosen_weights"]
    return SimpleNamespace(loss=loss, error=error, per_pair=captured["per_sequence_loss"],
                           chosen_rewards=captured["chosen_rewards"], rejected_rewards=captured["rejected_rewards"],
                           wpo=None if weights is None else weights * captured["rejected_weights"])


# trl 1.16 applies the WPO weights in place (`per_sequence_loss *= chosen_weights * rejected_weights`): on
# sft's expanded batch value that raises in the forward, on hinge's relu output it breaks the backward.
# For those terms the reference is TRL's own per-pair values and TRL's own weights, multiplied out of place.
IN_PLACE_WEIGHTING_FAILS = {"sft", "hinge"}


def trl_expected(spec: LossSpec, beta: float, batch: SimpleNamespace, policy_leaf: torch.Tensor) -> SimpleNamespace:
    """TRL's result for `spec`: one TRL run, or (see IN_PLACE_WEIGHTING_FAILS) its terms re-weighted out of place."""
    if not (spec.use_weighting and set(spec.names) & IN_PLACE_WEIGHTING_FAILS):
        trl = run_trl(spec, beta, batch, policy_leaf)
        assert trl.error is None, trl.error
        return SimpleNamespace(loss=trl.loss, per_pair=trl.per_pair if len(spec.names) == 1 else None,
                               chosen_rewards=trl.chosen_rewards, rejected_rewards=trl.rejected_rewards)
    weighted = run_trl(spec, beta, batch, policy_leaf)  # TRL's own WPO weights, whether or not it fails later
    unweighted = [run_trl(spec_of([name], use_weighting=False, ld_alpha=spec.ld_alpha, f_divergence=spec.f_divergence,
                                  f_alpha=spec.f_alpha, label_smoothing=spec.label_smoothing), beta, batch, policy_leaf)
                  for name in spec.names]
    per_pair = sum(w * weighted.wpo * term.per_pair for w, term in zip(spec.weights, unweighted))
    return SimpleNamespace(loss=per_pair.mean(), per_pair=per_pair, chosen_rewards=unweighted[0].chosen_rewards,
                           rejected_rewards=unweighted[0].rejected_rewards)


def run_ours(spec: LossSpec, beta: float, batch: SimpleNamespace, loss=None):
    """Our loss on `batch`: (per-pair output, gradient of the mean loss w.r.t. the policy token log-probs)."""
    leaf = batch.policy.clone().requires_grad_(True)
    pairs = pair_logps_from_tokens(leaf, batch.reference, batch.answer_mask, ld_alpha=spec.ld_alpha,
                                   log_sum_sq_probs=batch.log_sum_sq if spec.use_weighting else None)
    loss = loss or build_preference_loss(spec)
    out = loss(pairs, beta, update_state=True)
    out.losses.mean().backward()
    return out, leaf.grad


def assert_matches_trl(spec: LossSpec, batch: SimpleNamespace, beta: float = BETA) -> None:
    ours, our_grad = run_ours(spec, beta, batch)
    leaf = batch.policy.clone().requires_grad_(True)
    trl = trl_expected(spec, beta, batch, leaf)
    trl.loss.backward()
    torch.testing.assert_close(ours.losses.mean(), trl.loss.detach(), **TOLERANCE)
    if trl.per_pair is not None:
        torch.testing.assert_close(ours.losses.detach(), trl.per_pair.detach(), **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, trl.chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(ours.rejected_rewards, trl.rejected_rewards, **TOLERANCE)
    torch.testing.assert_close(our_grad, leaf.grad, **TOLERANCE)
    assert leaf.grad.abs().sum() > 0  # the comparison is not between two zeros


def option_sets(name: str) -> list[dict]:
    """Plain, each f-divergence where TRL allows it, WPO where it applies, LD-DPO, and all options at once."""
    sets = [{}, {"ld_alpha": 0.4}, {"ld_alpha": 0.0}]
    if name in F_DIVERGENCE_LOSSES:
        sets += [{"f_divergence": "forward_kl"}, {"f_divergence": "js_divergence"},
                 {"f_divergence": "alpha_divergence", "f_alpha": 1.0}]
    if name not in NO_WEIGHTING_LOSSES:
        sets.append({"use_weighting": True})
        sets.append({"use_weighting": True, "ld_alpha": 0.4,
                     "f_divergence": "js_divergence" if name in F_DIVERGENCE_LOSSES else "reverse_kl"})
    return sets


CASES = [(name, options) for name in TRL_LOSS_NAMES if name != "bco_pair" for options in option_sets(name)]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}"
                                                      for n, o in CASES])
def test_each_loss_type_and_option_matches_trl(name, options):
    assert_matches_trl(spec_of([name], **options), make_batch(seed=len(name)))


@pytest.mark.parametrize("name", sorted(F_DIVERGENCE_LOSSES - {"cdpo"}))
@pytest.mark.parametrize("f_alpha", [0.5, 0.3, 1.6])
def test_alpha_divergence_matches_trl_in_float32(name, f_alpha):
    """TRL's alpha_divergence supports float16/bfloat16/float32 only (its exp cap is looked up per dtype)."""
    assert_matches_trl(spec_of([name], f_divergence="alpha_divergence", f_alpha=f_alpha),
                       make_batch(seed=7, dtype=torch.float32))


@pytest.mark.parametrize("name", ["robust", "aot", "aot_unpaired"])
def test_label_smoothing_zero_matches_trl(name):
    assert_matches_trl(spec_of([name], label_smoothing=0.0), make_batch(seed=11))


@pytest.mark.parametrize("options", [{}, {"use_weighting": True}, {"ld_alpha": 0.4}, {"ld_alpha": 0.4,
                                                                                      "use_weighting": True}])
def test_bco_pair_matches_trl_with_its_reward_shift(options):
    """trl 1.x's bco_pair has no reward shift delta; ours subtracts the running mean delta from both rewards,
    which is TRL's loss with both reference log-probs raised by delta / beta. A fresh state's delta is the
    batch's own mean reward."""
    spec, batch = spec_of(["bco_pair"], **options), make_batch(seed=5)
    ours, our_grad = run_ours(spec, BETA, batch)
    delta = torch.cat([ours.chosen_rewards, ours.rejected_rewards]).mean().item()
    assert abs(delta) > 1e-3  # the shift is exercised
    leaf = batch.policy.clone().requires_grad_(True)
    trl = run_trl(spec, BETA, batch, leaf, reference_shift=delta / BETA)
    trl.loss.backward()
    torch.testing.assert_close(ours.losses.detach(), trl.per_pair.detach(), **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards - delta, trl.chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(ours.rejected_rewards - delta, trl.rejected_rewards, **TOLERANCE)
    torch.testing.assert_close(our_grad, leaf.grad, **TOLERANCE)


def test_bco_pair_with_zero_mean_rewards_is_trls_loss_unchanged():
    """When the rewards average to 0 the shift vanishes and ours is exactly trl's bco_pair."""
    batch = make_batch(seed=6)
    chosen, rejected = torch.where(batch.answer_mask, batch.policy - batch.reference, 0.0).sum(1).chunk(2)
    offset = torch.cat([chosen, rejected]).mean()  # put it on one reference token of every row
    first_answer_token = batch.answer_mask.float().argmax(dim=1)
    batch.reference[torch.arange(2 * PAIRS), first_answer_token] += offset
    assert_matches_trl(spec_of(["bco_pair"]), batch)


@pytest.mark.parametrize("names, weights, options", [
    (["sigmoid", "sft"], [1.0, 0.5], {}),  # RPO
    (["sigmoid", "sft"], [1.0, 1.0], {"ld_alpha": 0.3, "use_weighting": True}),
    (["sigmoid", "sft"], [1.0, 0.2], {"f_divergence": "forward_kl"}),
    (["ipo", "hinge", "sigmoid_norm"], [0.3, 0.5, 2.0], {"ld_alpha": 0.5}),
    (["apo_zero", "nca_pair", "sppo_hard", "discopop"], [1.0, 0.1, 0.2, 0.7], {"use_weighting": True}),
    (["aot", "aot_unpaired", "exo_pair", "robust"], [0.4, 0.6, 1.0, 0.1], {"label_smoothing": 1e-3}),
])
def test_weighted_sums_match_trl(names, weights, options):
    assert_matches_trl(spec_of(names, weights, **options), make_batch(seed=21))


def test_mpo_combination_with_bco_pair_matches_trl_term_by_term():
    """sigmoid + bco_pair + sft (TRL's MPO example, weights 0.8, 0.2, 1.0): per pair, the weighted sum of
    TRL's single-loss values (bco_pair with its shift), and the gradient of the mean."""
    spec, batch = spec_of(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]), make_batch(seed=8)
    ours, our_grad = run_ours(spec, BETA, batch)
    delta = torch.cat([ours.chosen_rewards, ours.rejected_rewards]).mean().item()
    leaf = batch.policy.clone().requires_grad_(True)
    terms = [run_trl(spec_of([name]), BETA, batch, leaf, reference_shift=delta / BETA if name == "bco_pair" else 0.0)
             for name in spec.names]
    torch.testing.assert_close(ours.losses.detach(), sum(w * t.per_pair.detach() for w, t in zip(spec.weights, terms)),
                               **TOLERANCE)
    sum(w * t.loss for w, t in zip(spec.weights, terms)).backward()
    torch.testing.assert_close(our_grad, leaf.grad, **TOLERANCE)


@pytest.mark.parametrize("options", [{}, {"f_divergence": "forward_kl"}, {"f_divergence": "js_divergence"},
                                     {"ld_alpha": 0.4, "use_weighting": True}])
def test_cdpo_is_trls_sigmoid_mixed_with_its_swapped_pairs(options):
    """cdpo = (1 - eps) sigmoid(d) + eps sigmoid(-d); TRL's sigmoid with chosen and rejected swapped gives
    the second (f-divergence scores are per answer, so swapping flips d)."""
    spec, batch = spec_of(["cdpo"], **options), make_batch(seed=9)
    ours, our_grad = run_ours(spec, BETA, batch)
    sigmoid = spec_of(["sigmoid"], **options)
    leaf = batch.policy.clone().requires_grad_(True)
    swapped = torch.cat([torch.arange(PAIRS, 2 * PAIRS), torch.arange(PAIRS)])
    kept, flipped = run_trl(sigmoid, BETA, batch, leaf), run_trl(sigmoid, BETA, batch, leaf, rows=swapped)
    eps = spec.label_smoothing
    torch.testing.assert_close(ours.losses.detach(), ((1 - eps) * kept.per_pair + eps * flipped.per_pair).detach(),
                               **TOLERANCE)
    ((1 - eps) * kept.loss + eps * flipped.loss).backward()
    torch.testing.assert_close(our_grad, leaf.grad, **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, kept.chosen_rewards, **TOLERANCE)


@pytest.mark.parametrize("label_smoothing, gamma", [(0.0, 0.6), (0.1, 0.6), (0.0, 0.0), (0.2, 1.5)])
def test_simpo_matches_trl_cpo_trainer(label_smoothing, gamma):
    """SimPO is TRL's CPOTrainer loss_type="simpo" on per-token averaged log-probs (no reference)."""
    CPOTrainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer

    spec, batch = spec_of(["simpo"], label_smoothing=label_smoothing, simpo_gamma=gamma), make_batch(seed=10)
    ours, our_grad = run_ours(spec, 2.5, batch)
    leaf = batch.policy.clone().requires_grad_(True)
    mask = batch.answer_mask
    averages = (leaf.masked_fill(~mask, 0) * mask).sum(-1) / mask.sum(-1)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=2.5,
                              label_smoothing=label_smoothing, accelerator=StandInAccelerator())
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, *averages.chunk(2))
    losses.mean().backward()
    torch.testing.assert_close(ours.losses.detach(), losses.detach(), **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOLERANCE)
    torch.testing.assert_close(our_grad, leaf.grad, **TOLERANCE)


@pytest.mark.parametrize("name, function", [("sigmoid", sigmoid_dpo_loss), ("hinge", hinge_loss)])
def test_classic_five_argument_losses_match_trl(name, function):
    batch = make_batch(seed=12)
    leaf = batch.policy.clone().requires_grad_(True)
    in_answer = batch.answer_mask
    policy = torch.where(in_answer, leaf, 0.0).sum(1)
    reference = torch.where(in_answer, batch.reference, 0.0).sum(1)
    ours = function(*policy.chunk(2), *reference.chunk(2), BETA)
    trl_leaf = batch.policy.clone().requires_grad_(True)
    trl = run_trl(spec_of([name]), BETA, batch, trl_leaf)
    ours.losses.mean().backward()
    trl.loss.backward()
    torch.testing.assert_close(ours.losses.detach(), trl.per_pair.detach(), **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, trl.chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, **TOLERANCE)


def test_classic_ipo_on_averaged_log_probs_has_trls_ipo_loss():
    """The classic ipo_loss, given length-averaged log-probs (as the engine passes them), is TRL's ipo loss;
    its rewards are beta times the averaged log-ratios (TRL's: the summed ones)."""
    batch = make_batch(seed=13)
    lengths = batch.answer_mask.sum(1).double()
    policy = torch.where(batch.answer_mask, batch.policy, 0.0).sum(1) / lengths
    reference = torch.where(batch.answer_mask, batch.reference, 0.0).sum(1) / lengths
    ours = ipo_loss(*policy.chunk(2), *reference.chunk(2), BETA)
    trl = run_trl(spec_of(["ipo"]), BETA, batch, batch.policy.clone().requires_grad_(True))
    torch.testing.assert_close(ours.losses, trl.per_pair.detach(), **TOLERANCE)
