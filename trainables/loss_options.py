"""The preference-loss family's names, options and rules, without torch (the config layer imports this).

A `LossSpec` says which loss the engine optimises: one name or a weighted sum of names (sigmoid + sft
is RPO), with the options TRL's DPOTrainer offers (f-divergence, WPO weighting, LD-DPO) and the
per-loss constants (label smoothing, SimPO's gamma, DiscoPOP's tau). `check_loss_spec` is the one rule
for which combinations are valid; its messages name the `dpo.*` config keys. The tables below say what
each loss reads, so the engine knows before training whether it needs a reference pass, answer lengths,
per-token log-probs or a running state. The math is in trainables/loss_family.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# TRL's DPOTrainer loss types (trl 1.16, DPOConfig.loss_type), then this engine's two extra names.
TRL_LOSS_NAMES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
LOSS_NAMES = TRL_LOSS_NAMES + ("cdpo", "simpo")  # cdpo: sigmoid with label smoothing; simpo: reference-free

# What each loss reads besides the four per-pair log-probs.
REFERENCE_FREE_LOSSES = frozenset({"simpo", "sft"})  # never read the reference log-probs
LENGTH_LOSSES = frozenset({"ipo", "sigmoid_norm", "simpo", "sft"})  # read the answers' token counts
STATEFUL_LOSSES = frozenset({"bco_pair"})  # keep a running mean of the rewards (state_dict / load_state_dict)
BATCH_LOSSES = frozenset({"aot", "aot_unpaired", "sft"})  # a pair's value depends on the other pairs of its batch
# Losses built on the chosen-minus-rejected score, the only ones f-DPO generalises (TRL's list, plus cdpo).
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft",
                                 "cdpo"})
NO_WEIGHTING_LOSSES = frozenset({"aot", "aot_unpaired"})  # they sort the batch, so per-pair WPO weights misalign
# label_smoothing: the losses that read it and the interval it must lie in ((low, high), closed at low if the flag).
LABEL_SMOOTHING_RANGES: dict[str, tuple[float, float, bool]] = {
    "cdpo": (0.0, 0.5, False),  # 0 would be plain sigmoid DPO: almost surely a missing setting
    "exo_pair": (0.0, 0.5, False),  # log(eps) must be finite; the EXO paper recommends 1e-3
    "robust": (0.0, 0.5, True),
    "aot": (0.0, 0.5, True),
    "aot_unpaired": (0.0, 0.5, True),
    "simpo": (0.0, 0.5, True),
}

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossSpec:
    """Which preference loss to optimise; no defaults here (the config's are the only ones).

    names: one or more of LOSS_NAMES; the loss is sum_k weights[k] * loss_k (each per pair).
    label_smoothing: eps of cdpo, robust, exo_pair, aot, aot_unpaired, simpo (0 for the others).
    f_divergence, f_alpha: f-DPO's divergence and the alpha of alpha_divergence (TRL's f_alpha_divergence_coef).
    use_weighting: WPO weights; ld_alpha: LD-DPO's alpha in [0, 1], None for plain summed log-probs.
    simpo_gamma: SimPO's target margin gamma; discopop_tau: DiscoPOP's temperature tau.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    label_smoothing: float
    f_divergence: str
    f_alpha: float
    use_weighting: bool
    ld_alpha: float | None
    simpo_gamma: float
    discopop_tau: float

    def with_names(self, names: tuple[str, ...]) -> "LossSpec":
        """The same options with other loss names, each weighted 1 (a sweep's loss dimension)."""
        return replace(self, names=tuple(names), weights=(1.0,) * len(names))

    @property
    def needs_reference(self) -> bool:
        """False only when every term is reference-free (the engine then skips the reference pass)."""
        return any(name not in REFERENCE_FREE_LOSSES for name in self.names)

    @property
    def needs_lengths(self) -> bool:
        """PairLogps.chosen_lengths / rejected_lengths (answer token counts) must be given."""
        return any(name in LENGTH_LOSSES for name in self.names)

    @property
    def needs_token_logps(self) -> bool:
        """LD-DPO builds its log-probs from per-token values (policy and reference) and the answer mask."""
        return self.ld_alpha is not None

    @property
    def stateful(self) -> bool:
        """The built loss keeps a state that must be checkpointed and restored (bco_pair)."""
        return any(name in STATEFUL_LOSSES for name in self.names)

    @property
    def length_normalized(self) -> bool:
        """Every term works on per-token averages: its beta lives on the length-normalised scale."""
        return all(name in {"ipo", "sigmoid_norm", "simpo"} for name in self.names)


def check_loss_spec(spec: LossSpec) -> None:
    """Raise ValueError (naming the dpo.* key) unless `spec` is a loss the engine can build."""
    names = spec.names
    if not names:
        raise ValueError("dpo.loss: give at least one loss name")
    unknown = [name for name in names if name not in LOSS_NAMES]
    if unknown:
        raise ValueError(f"dpo.loss: unknown preference loss {unknown[0]!r}; valid names are {sorted(LOSS_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"dpo.loss: each name may appear once, got {list(names)}; weight it with dpo.loss_weights")
    if len(spec.weights) != len(names):
        raise ValueError(f"dpo.loss_weights: one weight per name of dpo.loss, got {len(spec.weights)} weights for "
                         f"{list(names)}")
    if not all(math.isfinite(w) and w > 0 for w in spec.weights):
        raise ValueError(f"dpo.loss_weights: every weight must be a finite number > 0, got {list(spec.weights)}")
    if "simpo" in names and not set(names) <= REFERENCE_FREE_LOSSES:
        raise ValueError(f"dpo.loss: simpo is reference-free and reports its own rewards; combine it only with "
                         f"sft, got {list(names)}")
    _check_label_smoothing(names, spec.label_smoothing)
    if spec.f_divergence not in F_DIVERGENCES:
        raise ValueError(f"dpo.f_divergence: unknown {spec.f_divergence!r}; valid values are {list(F_DIVERGENCES)}")
    if spec.f_divergence != "reverse_kl":
        others = [name for name in names if name not in F_DIVERGENCE_LOSSES]
        if others:
            raise ValueError(f"dpo.f_divergence: {spec.f_divergence!r} only applies to the losses built on the "
                             f"chosen-minus-rejected score, {sorted(F_DIVERGENCE_LOSSES)}; not to {others}. Use "
                             f"reverse_kl with these losses")
    if spec.f_divergence == "alpha_divergence" and not math.isfinite(spec.f_alpha):
        raise ValueError(f"dpo.f_alpha: must be a finite number, got {spec.f_alpha}")
    if spec.use_weighting and set(names) & NO_WEIGHTING_LOSSES:
        raise ValueError(f"dpo.use_weighting: WPO weights are per pair, but {sorted(set(names) & NO_WEIGHTING_LOSSES)}"
                         f" sort the batch; use them without weighting")
    if spec.ld_alpha is not None and not 0.0 <= spec.ld_alpha <= 1.0:
        raise ValueError(f"dpo.ld_alpha: must be in [0, 1] (1 = plain summed log-probs, 0 = only the tokens within "
                         f"the shorter answer's length), got {spec.ld_alpha}")
    if "simpo" in names and not (math.isfinite(spec.simpo_gamma) and spec.simpo_gamma >= 0):
        raise ValueError(f"dpo.simpo_gamma: must be a finite number >= 0, got {spec.simpo_gamma}")
    if "discopop" in names and not (math.isfinite(spec.discopop_tau) and spec.discopop_tau > 0):
        raise ValueError(f"dpo.discopop_tau: must be a number > 0, got {spec.discopop_tau}")


def _check_label_smoothing(names: tuple[str, ...], label_smoothing: float) -> None:
    readers = [name for name in names if name in LABEL_SMOOTHING_RANGES]
    if not readers:
        if label_smoothing != 0.0:
            raise ValueError(f"dpo.label_smoothing: only used by dpo.loss=cdpo, robust, exo_pair, aot, aot_unpaired "
                             f"or simpo; {label_smoothing} does not apply to {'+'.join(names)!r}: set it to 0 or use "
                             f"one of those losses")
        return
    for name in readers:
        low, high, low_closed = LABEL_SMOOTHING_RANGES[name]
        if not ((low <= label_smoothing if low_closed else low < label_smoothing) and label_smoothing < high):
            interval = f"{'[' if low_closed else '('}{low}, {high})"
            hint = {"cdpo": " (0 is plain sigmoid DPO)", "exo_pair": " (the EXO paper recommends 1e-3)"}.get(name, "")
            raise ValueError(f"dpo.label_smoothing: loss {name!r} needs label_smoothing in {interval}, got "
                             f"{label_smoothing}{hint}")
