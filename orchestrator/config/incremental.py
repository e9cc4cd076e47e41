"""The settings of the incremental beta procedure (docs/method.md): one frozen dataclass that owns the
procedure's defaults and rules, read by the config (`sweep.*` keys take their defaults and bounds from
here) and by the Tune searcher (orchestrator/ray/searchers.py). Pure Python: no ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from analysis.stability import DEFAULT_DIVERGENCE_RATIO, DEFAULT_OSCILLATION_THRESHOLD, DEFAULT_WINDOW

# task prior -> (start_beta, min_beta, max_beta) on the sigmoid loss's scale: the heuristic priors by task
# complexity (docs/method.md); None: 0.1 (the DPO paper's and TRL's default), down to 0.005 (below Zephyr's
# 0.01, arXiv 2310.16944, and the 0.01 the Hugging Face preference-tuning beta scan found best), up to 1.
TASK_PRIORS: dict[str | None, tuple[float, float, float]] = {
    None: (0.1, 0.005, 1.0),
    "simple": (0.5, 0.5, 1.0),  # e.g. binary preference classification
    "complex": (0.1, 0.1, 0.3),  # e.g. long-form generation
}
SIGMOID_SCALE = 0.1  # the start beta every prior above is written for
# Where each loss's beta lives (docs/sweeps.md, "Per-loss beta priors"): the start of the incremental
# procedure, and the factor (this / 0.1) its bounds and step are scaled by. Losses not listed: 0.1.
LOSS_BETA_PRIORS: dict[str, float] = {
    "ipo": 0.01,  # tau of IPO on length-averaged log-probs: best at 0.01 in the HF preference-tuning scan
    "sigmoid_norm": 2.0,  # length-normalised DPO: Tulu 3 (arXiv 2411.15124) used 5; SimPO's scale is 2-2.5
    "simpo": 2.0,  # SimPO (arXiv 2405.14734): beta 2-2.5 in the paper's setups
}
# When the first climb fails, the procedure explores these multiples of the start beta, in order (0.1 ->
# 0.05, 0.02, 0.01, 0.005), before it stops: the published optima of DPO sit an order of magnitude below 0.1.
DOWNWARD_FACTORS = (0.5, 0.2, 0.1, 0.05)


def beta_prior(loss_names: tuple[str, ...] | str) -> float:
    """The start beta of a loss (a name or the names of a weighted sum: the first term other than sft)."""
    names = (loss_names,) if isinstance(loss_names, str) else tuple(loss_names)
    preference = [name for name in names if name != "sft"] or list(names)
    return LOSS_BETA_PRIORS.get(preference[0], SIGMOID_SCALE)


BACKOFFS = ("halve_step", "raise_kl_weight")
STEP_RANGE = (0.1, 0.2)  # beta increase per improving round
BETA_DECIMALS = 6  # betas are rounded so that 0.1 + 0.2 compares equal to 0.3


@dataclass(frozen=True)
class IncrementalBetaSettings:
    """Plain settings of the incremental beta procedure; None bounds come from the task prior."""

    task: str | None = None  # None | "simple" (beta 0.5-1.0) | "complex" (beta 0.1-0.3), times beta_scale
    beta_scale: float = 1.0  # the loss's prior / 0.1 (beta_prior): scales the task prior's bounds and the step
    start_beta: float | None = None  # first round's beta; default from the task prior
    min_beta: float | None = None  # back-offs never go below this
    max_beta: float | None = None  # climbing stops here ("reached upper bound")
    step: float = 0.1  # beta increase per improving round, within STEP_RANGE (times beta_scale)
    explore_down: bool = True  # first climb failed (halve_step back-off): try start * DOWNWARD_FACTORS first
    backoff: str = "halve_step"  # "halve_step": beta -= step / 2 | "raise_kl_weight": kl_weights *= factor
    kl_weight_factor: float = 2.0  # multiplier of every kl_weight on a "raise_kl_weight" back-off
    min_raised_kl_weight: float = 0.01  # a kl_weight of 0 is raised to this (0 * factor stays 0)
    patience: int = 2  # stop after this many rounds in a row without improvement
    max_rounds: int = 10  # hard limit on rounds
    min_improvement: float = 0.0  # the metric must beat the best so far by more than this
    learning_rates: tuple[float, ...] = (1e-4,)  # fan-out: one trial per (learning_rate, kl_weight)
    kl_weights: tuple[float, ...] = (0.0,)  # fan-out, and the starting lambda values
    loss_key: str = "train/loss"  # per-report loss, accumulated from on_trial_result
    loss_history_key: str = "loss_history"  # full loss list in the final result; preferred if present
    stability_window: int = DEFAULT_WINDOW  # passed to analysis.stability.assess_loss_curve
    oscillation_threshold: float = DEFAULT_OSCILLATION_THRESHOLD  # ditto
    divergence_ratio: float = DEFAULT_DIVERGENCE_RATIO  # ditto

    def __post_init__(self) -> None:
        where = "IncrementalBetaSettings"
        if self.task not in TASK_PRIORS:
            raise ValueError(f"{where}.task: expected one of None, 'simple', 'complex'; got {self.task!r}.")
        if not (math.isfinite(self.beta_scale) and self.beta_scale > 0):
            raise ValueError(f"{where}.beta_scale: must be a finite number > 0; got {self.beta_scale}.")
        prior_start, prior_min, prior_max = TASK_PRIORS[self.task]
        for name, prior in (("start_beta", prior_start), ("min_beta", prior_min), ("max_beta", prior_max)):
            value = prior * self.beta_scale if getattr(self, name) is None else getattr(self, name)
            object.__setattr__(self, name, round(float(value), BETA_DECIMALS))
        object.__setattr__(self, "learning_rates", tuple(float(v) for v in self.learning_rates))
        object.__setattr__(self, "kl_weights", tuple(float(v) for v in self.kl_weights))
        if not 0 < self.min_beta <= self.start_beta <= self.max_beta:
            raise ValueError(
                f"{where}: need 0 < min_beta <= start_beta <= max_beta, got {self.min_beta}, "
                f"{self.start_beta}, {self.max_beta} (task={self.task!r}); fix the beta bounds."
            )
        if not STEP_RANGE[0] <= self.step <= STEP_RANGE[1]:
            raise ValueError(f"{where}.step: the procedure raises beta by {STEP_RANGE[0]} to {STEP_RANGE[1]} per round; got {self.step}.")
        if self.backoff not in BACKOFFS:
            raise ValueError(f"{where}.backoff: expected one of {BACKOFFS}; got {self.backoff!r}.")
        if self.kl_weight_factor <= 1 or self.min_raised_kl_weight <= 0:
            raise ValueError(f"{where}: kl_weight_factor must be > 1 and min_raised_kl_weight > 0.")
        if self.patience < 1 or self.max_rounds < 1 or self.min_improvement < 0:
            raise ValueError(f"{where}: need patience >= 1, max_rounds >= 1, min_improvement >= 0.")
        object.__setattr__(self, "beta_scale", float(self.beta_scale))
        if not self.learning_rates or any(v <= 0 for v in self.learning_rates):
            raise ValueError(f"{where}.learning_rates: need at least one value, all > 0; got {self.learning_rates}.")
        if not self.kl_weights or any(v < 0 for v in self.kl_weights):
            raise ValueError(f"{where}.kl_weights: need at least one value, all >= 0; got {self.kl_weights}.")

    @property
    def beta_step(self) -> float:
        """The beta increase of a climb: `step` on the loss's own scale."""
        return round(self.step * self.beta_scale, BETA_DECIMALS)

    def downward_betas(self) -> list[float]:
        """The betas the downward exploration tries, in order: start * DOWNWARD_FACTORS, not below min_beta."""
        values = [round(self.start_beta * factor, BETA_DECIMALS) for factor in DOWNWARD_FACTORS]
        return [beta for beta in values if beta >= self.min_beta]


def default_of(name: str) -> Any:
    """The procedure's default for one setting (the config's `sweep.<name>` default)."""
    return next(field.default for field in fields(IncrementalBetaSettings) if field.name == name)


def settings_from_sweep(sweep: Any, learning_rates: tuple[float, ...], kl_weights: tuple[float, ...],
                        loss_names: tuple[str, ...] = ("sigmoid",)) -> IncrementalBetaSettings:
    """The procedure's settings from a validated `sweep:` section: every key the two share, the fan-out, and
    the scale of the sweep's loss (beta_prior)."""
    shared = {field.name for field in fields(IncrementalBetaSettings)} & set(type(sweep).model_fields)
    return IncrementalBetaSettings(**sweep.model_dump(include=shared), learning_rates=learning_rates, kl_weights=kl_weights,
                                   beta_scale=beta_prior(loss_names) / SIGMOID_SCALE)
