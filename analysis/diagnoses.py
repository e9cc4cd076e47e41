"""The failure modes users ask about most, diagnosed from each trial's metric curves, with what to try.

Each diagnosis is a pure rule on one trial's curves ({metric key: pandas Series indexed by step}), so it is
unit-tested on synthetic curves and applied the same way by `dpo analyze` (analysis/report.py lists every
finding with the trials it concerns):

- likelihood displacement: the chosen answers' log-probability falls while the reward margin grows: the
  policy widens the margin by pushing both answers down (Razin et al. 2024, arXiv 2410.08847; Pal et al.
  2024, Smaug / DPO-Positive, arXiv 2402.13228). Try an SFT term on the chosen answers (RPO, Liu et al.
  2024, arXiv 2405.16436): `dpo.loss: [sigmoid, sft]` with `dpo.loss_weights: [1.0, 0.2]`.
- length exploitation: on held-out pairs the margin correlates with how much longer the chosen answer is,
  and more so as training goes on (`eval/margin_length_correlation`; Park et al. 2024, arXiv 2403.19159).
  Try a length-normalised loss (`dpo.loss: sigmoid_norm`, `simpo`, `ipo`) or LD-DPO (`dpo.ld_alpha: 0.5`).
- exploding rewards or KL: the implicit rewards reach magnitudes where the sigmoid has saturated, or the
  exact per-token KL to the reference keeps growing fast (or any of them is not finite). Try a higher
  `dpo.beta`, a `dpo.kl_weight`, or a lower learning rate.

Curves are read on the held-out side (`eval/`) when the trial logged it, else on `train/`.
Tested by `python -m pytest tests/test_analysis.py -q`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import pandas as pd

DISPLACEMENT_NATS = 1.0  # the chosen log-prob (per answer, summed) must fall by more than this
MARGIN_GROWTH = 0.05  # ... while the reward margin grows by more than this
LENGTH_CORRELATION = 0.3  # final margin-length correlation at or above this ...
LENGTH_CORRELATION_GROWTH = 0.1  # ... and grown by at least this since the first evaluation
EXPLODING_REWARD = 20.0  # |implicit reward| beyond which sigma(reward margin) is 1 - 2e-9: saturated
EXPLODING_KL = 10.0  # exact KL(pi || pi_ref) in nats per answer token beyond which a run has left the reference
KL_GROWTH = 3.0  # ... or the KL multiplied by more than this over the last third of the run (and above 1 nat)

Curves = Mapping[str, pd.Series]


@dataclass(frozen=True)
class Finding:
    """One trial showing one failure mode, with the numbers that show it."""

    trial_id: str
    evidence: str


@dataclass
class Diagnosis:
    """A failure mode, what to try, and the trials that show it."""

    name: str
    title: str
    suggestion: str
    findings: list[Finding] = field(default_factory=list)


def _curve(curves: Curves, name: str) -> tuple[str, pd.Series] | None:
    """(key, finite values in step order) of eval/<name>, else train/<name>; None with fewer than 2 points."""
    for key in (f"eval/{name}", f"train/{name}"):
        series = curves.get(key)
        if series is not None and len(series) >= 2:
            return key, series.sort_index()
    return None


def likelihood_displacement(curves: Curves) -> str | None:
    """The chosen log-prob fell by more than DISPLACEMENT_NATS while the reward margin grew."""
    chosen, margin = _curve(curves, "logp_chosen"), _curve(curves, "reward_margin")
    if chosen is None or margin is None:
        return None
    (chosen_key, logp), (margin_key, rewards) = chosen, margin
    fall, growth = float(logp.iloc[0] - logp.iloc[-1]), float(rewards.iloc[-1] - rewards.iloc[0])
    if not (math.isfinite(fall) and math.isfinite(growth)) or fall <= DISPLACEMENT_NATS or growth <= MARGIN_GROWTH:
        return None
    return (f"{chosen_key} fell from {logp.iloc[0]:.4g} to {logp.iloc[-1]:.4g} while {margin_key} grew from "
            f"{rewards.iloc[0]:.4g} to {rewards.iloc[-1]:.4g}")


def length_exploitation(curves: Curves) -> str | None:
    """The held-out margin-length correlation ends >= LENGTH_CORRELATION, grown by LENGTH_CORRELATION_GROWTH."""
    found = _curve(curves, "margin_length_correlation")
    if found is None:
        return None
    key, correlation = found
    first, last = float(correlation.iloc[0]), float(correlation.iloc[-1])
    if not (last >= LENGTH_CORRELATION and last - first >= LENGTH_CORRELATION_GROWTH):
        return None
    return f"{key} rose from {first:.2f} to {last:.2f}: the longer the chosen answer, the larger the margin"


def exploding_rewards_or_kl(curves: Curves) -> str | None:
    """Non-finite rewards/KL, |reward| > EXPLODING_REWARD, KL > EXPLODING_KL, or KL x KL_GROWTH in the last third."""
    problems = []
    for name in ("reward_chosen", "reward_rejected", "reward_margin", "kl"):
        found = _curve(curves, name)
        if found is None:
            continue
        key, values = found
        if not all(math.isfinite(v) for v in values.tolist()):
            problems.append(f"{key} is not finite")
            continue
        last = float(values.iloc[-1])
        if name.startswith("reward") and abs(last) > EXPLODING_REWARD:
            problems.append(f"{key} reached {last:.4g} (|reward| > {EXPLODING_REWARD:g}: the sigmoid has saturated)")
        if name == "kl":
            earlier = float(values.iloc[(2 * (len(values) - 1)) // 3])
            if last > EXPLODING_KL:
                problems.append(f"{key} reached {last:.4g} nats per token (> {EXPLODING_KL:g})")
            elif last > 1.0 and earlier > 0 and last / earlier > KL_GROWTH:
                problems.append(f"{key} grew {last / earlier:.1f}x over the last third of the run, to {last:.4g}")
    return "; ".join(problems) or None


RULES: dict[str, tuple[str, str, Callable[[Curves], str | None]]] = {
    "likelihood_displacement": (
        "Likelihood displacement: chosen log-probs fall while the margin grows",
        "add an SFT term on the chosen answers (RPO): dpo.loss: [sigmoid, sft] with dpo.loss_weights: [1.0, 0.2]",
        likelihood_displacement),
    "length_exploitation": (
        "Length exploitation: the margin grows with the chosen answer's extra length",
        "use a length-normalised loss (dpo.loss: sigmoid_norm, simpo or ipo) or LD-DPO (dpo.ld_alpha: 0.5)",
        length_exploitation),
    "exploding_rewards_or_kl": (
        "Exploding rewards or KL",
        "raise dpo.beta (the policy is held closer to the reference), add or raise dpo.kl_weight, or lower "
        "train.learning_rate", exploding_rewards_or_kl),
}


def diagnose(trial_curves: Mapping[str, Curves]) -> list[Diagnosis]:
    """Every rule over every trial ({trial_id: curves}); one Diagnosis per rule, with its findings (maybe none)."""
    diagnoses = []
    for name, (title, suggestion, rule) in RULES.items():
        diagnosis = Diagnosis(name, title, suggestion)
        for trial_id, curves in sorted(trial_curves.items()):
            evidence = rule(curves)
            if evidence:
                diagnosis.findings.append(Finding(trial_id, evidence))
        diagnoses.append(diagnosis)
    return diagnoses


CURVE_KEYS = tuple(f"{split}/{name}" for split in ("eval", "train") for name in (
    "logp_chosen", "reward_margin", "reward_chosen", "reward_rejected", "kl", "margin_length_correlation"))


def curves_by_trial(long_frame: pd.DataFrame) -> dict[str, dict[str, pd.Series]]:
    """analysis.runs.SweepRuns.curves(CURVE_KEYS) (long: trial_id, key, step, value) -> {trial: {key: Series}}."""
    result: dict[str, dict[str, pd.Series]] = {}
    for (trial_id, key), group in long_frame.groupby(["trial_id", "key"]):
        result.setdefault(str(trial_id), {})[str(key)] = pd.Series(group["value"].to_numpy(dtype=float),
                                                                   index=group["step"].to_numpy())
    return result
