"""The project's single definition of "training was stable": judges a loss curve, numpy only.

The incremental beta searcher (orchestrator/ray/searchers.py) and the reports in analysis/ both call
`assess_loss_curve`, so "stable", "oscillating" and "diverging" mean the same thing everywhere.
Tested by `python -m pytest tests/test_stability.py -q`.

Definitions (n = number of loss values, all computed on plain floats):

- non_finite: some value is NaN or +-inf. Such a curve is never stable.
- scale: the mean absolute loss over the whole curve; amplitudes are measured relative to it so
  that the thresholds do not depend on the loss's units.
- oscillation_score: take the last half of the curve (the tail, where training should have
  settled) and subtract its best monotone fit (isotonic regression by pool-adjacent-violators,
  non-increasing or non-decreasing, whichever leaves the smaller residual). What is left, the
  residual, is the up-and-down movement that no steady trend explains (a steady rise is
  divergence, judged below, not oscillation).
      relative_amplitude = std(residual) / scale
      regularity         = max over lags k = 1..4 of |autocorrelation_k(residual)|
      oscillation_score  = relative_amplitude * regularity
  A smooth (or sharply dropping) decrease has a zero residual. White noise around a plateau has a
  residual with little regularity (about 0.2 for 50 points), so 2 % noise scores about 0.004 and
  10 % noise about 0.02. A zig-zag has lag-1 autocorrelation near -1, a slow swing near +1 and a
  period-4 swing has lag-2 near -1, so a +-30 % zig-zag scores about 0.29 and a sine of 30 %
  amplitude about 0.2. Per-step losses noisier than about 15 % of their level (tiny batches) start
  to cross the default threshold by chance: report a smoothed loss or raise the threshold.
  oscillating = oscillation_score > oscillation_threshold (default 0.05).
- diverging: with the moving average of `window` points (shrunk to n // 4 for short curves),
  start = its first value, best = its minimum, end = the mean of the last `window` raw values;
      margin    = 3 * noise * sqrt(2 / window)   (noise = robust std of the step-to-step changes)
      diverging = end - best  > max((divergence_ratio - 1) * max(|best|, 0.1 * |start|), margin)
               or end - start > max(END_ABOVE_START_TOLERANCE * |start|, margin)
  i.e. the loss ends far above its minimum (default: 1.5 times it; the 10 %-of-start floor keeps
  losses that have fallen near zero from counting a tiny rise as divergence), or it ends above
  where it started (by 5 %: training made it worse); a rise within 3 standard errors of the
  averaged noise never counts, so a noisy plateau is not called diverging.
- stable = finite and not oscillating and not diverging. Curves with fewer than MIN_POINTS values
  cannot be judged; they are reported stable with a reason that says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DEFAULT_WINDOW = 10
DEFAULT_OSCILLATION_THRESHOLD = 0.05
DEFAULT_DIVERGENCE_RATIO = 1.5
END_ABOVE_START_TOLERANCE = 0.05  # ending 5 % above the starting level counts as diverging
NOISE_MARGIN_STANDARD_ERRORS = 3.0  # a rise smaller than 3 standard errors of the noise is noise
MIN_POINTS = 8  # fewer loss values than this cannot show an oscillation or a trend
MAX_AUTOCORRELATION_LAG = 4  # lags 1..4 catch zig-zags (lag 1), period-4 swings (lag 2), slow swings


@dataclass(frozen=True)
class StabilityReport:
    """The verdict on one loss curve; `reason` says in words why, for decision logs and reports."""

    stable: bool  # finite, not oscillating, not diverging
    oscillating: bool  # oscillation_score above the threshold
    diverging: bool  # ends far above its minimum, or above its start
    non_finite: bool  # some value is NaN or inf
    oscillation_score: float  # relative_amplitude * regularity of the tail residual (see module doc)
    reason: str  # one sentence: why this verdict

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for decision logs and MLflow tags)."""
        return {
            "stable": self.stable,
            "oscillating": self.oscillating,
            "diverging": self.diverging,
            "non_finite": self.non_finite,
            "oscillation_score": self.oscillation_score,
            "reason": self.reason,
        }


def non_increasing_fit(values: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit of `values` (pool-adjacent-violators algorithm)."""
    block_means: list[float] = []
    block_sizes: list[int] = []
    for value in values.tolist():
        block_means.append(value)
        block_sizes.append(1)
        # A later block above an earlier one violates "non-increasing": pool them.
        while len(block_means) > 1 and block_means[-1] > block_means[-2]:
            later_mean, later_size = block_means.pop(), block_sizes.pop()
            pooled_size = block_sizes[-1] + later_size
            block_means[-1] = (block_means[-1] * block_sizes[-1] + later_mean * later_size) / pooled_size
            block_sizes[-1] = pooled_size
    return np.repeat(np.asarray(block_means), block_sizes)


def autocorrelation(residual: np.ndarray, lag: int) -> float:
    """Sample autocorrelation of `residual` at `lag`; 0.0 for a constant series."""
    centered = residual - residual.mean()
    energy = float(np.dot(centered, centered))
    if lag >= len(centered) or energy <= 1e-30:
        return 0.0
    return float(np.dot(centered[:-lag], centered[lag:]) / energy)


def noise_std(curve: np.ndarray) -> float:
    """Robust step-to-step noise level: MAD of the first differences, scaled to a gaussian std."""
    steps = np.diff(curve)
    if len(steps) == 0:
        return 0.0
    median_absolute_deviation = float(np.median(np.abs(steps - np.median(steps))))
    return 1.4826 * median_absolute_deviation / math.sqrt(2.0)


def oscillation_score(losses: Sequence[float]) -> float:
    """relative_amplitude * regularity of the last half's residual (definition in the module doc)."""
    curve = np.asarray(losses, dtype=np.float64)
    tail = curve[len(curve) // 2 :]
    scale = float(np.mean(np.abs(curve)))
    if len(tail) < 2 or scale <= 1e-12:
        return 0.0
    falling_residual = tail - non_increasing_fit(tail)
    rising_residual = tail + non_increasing_fit(-tail)  # tail minus its best non-decreasing fit
    residual = min(falling_residual, rising_residual, key=lambda r: float(np.dot(r, r)))
    relative_amplitude = float(residual.std()) / scale
    max_lag = min(MAX_AUTOCORRELATION_LAG, len(tail) - 1)
    regularity = max(abs(autocorrelation(residual, lag)) for lag in range(1, max_lag + 1))
    return relative_amplitude * regularity


def assess_loss_curve(
    losses: Sequence[float],
    *,
    window: int = DEFAULT_WINDOW,
    oscillation_threshold: float = DEFAULT_OSCILLATION_THRESHOLD,
    divergence_ratio: float = DEFAULT_DIVERGENCE_RATIO,
) -> StabilityReport:
    """Judge a loss curve (values in training order): finite, oscillating, diverging, stable.

    `window` is the moving-average length for the divergence test, `oscillation_threshold` the
    oscillation_score above which the curve oscillates, `divergence_ratio` how many times its
    (smoothed) minimum the loss may end at. The exact definitions are in the module docstring.
    """
    if window < 1:
        raise ValueError(f"assess_loss_curve: window must be >= 1, got {window}; pass e.g. window=10.")
    if oscillation_threshold <= 0:
        raise ValueError(
            f"assess_loss_curve: oscillation_threshold must be > 0, got {oscillation_threshold}."
        )
    if divergence_ratio <= 1:
        raise ValueError(
            f"assess_loss_curve: divergence_ratio must be > 1 (a multiple of the minimum loss), "
            f"got {divergence_ratio}."
        )
    values = [float(value) for value in losses]
    bad_steps = [index for index, value in enumerate(values) if not math.isfinite(value)]
    if bad_steps:
        return StabilityReport(
            stable=False, oscillating=False, diverging=False, non_finite=True,
            oscillation_score=float("nan"),
            reason=f"loss is not finite at {len(bad_steps)} of {len(values)} points "
            f"(first at index {bad_steps[0]}: {values[bad_steps[0]]})",
        )
    if len(values) < MIN_POINTS:
        return StabilityReport(
            stable=True, oscillating=False, diverging=False, non_finite=False,
            oscillation_score=0.0,
            reason=f"only {len(values)} loss values (need >= {MIN_POINTS} to judge); assumed stable",
        )

    curve = np.asarray(values, dtype=np.float64)
    smoothing = max(1, min(window, len(curve) // 4))
    moving_average = np.convolve(curve, np.ones(smoothing) / smoothing, mode="valid")
    start, best = float(moving_average[0]), float(moving_average.min())
    end = float(curve[-smoothing:].mean())
    noise_margin = NOISE_MARGIN_STANDARD_ERRORS * noise_std(curve) * math.sqrt(2.0 / smoothing)
    allowed_rise = (divergence_ratio - 1.0) * max(abs(best), 0.1 * abs(start))
    ends_far_above_minimum = end - best > max(allowed_rise, noise_margin)
    ends_above_start = end - start > max(abs(start) * END_ABOVE_START_TOLERANCE, noise_margin)
    diverging = ends_far_above_minimum or ends_above_start

    score = oscillation_score(curve)
    oscillating = score > oscillation_threshold
    stable = not (diverging or oscillating)

    reasons = []
    if ends_above_start:
        reasons.append(f"diverging: loss ends at {end:.4g}, above its start {start:.4g}")
    elif ends_far_above_minimum:
        reasons.append(
            f"diverging: loss ends at {end:.4g}, more than {divergence_ratio:g}x its minimum {best:.4g}"
        )
    if oscillating:
        reasons.append(f"oscillating: score {score:.3f} > threshold {oscillation_threshold:g}")
    if stable:
        reasons.append(
            f"stable: oscillation score {score:.3f} <= {oscillation_threshold:g}, "
            f"ends at {end:.4g} (minimum {best:.4g}, start {start:.4g})"
        )
    return StabilityReport(
        stable=stable, oscillating=oscillating, diverging=diverging, non_finite=False,
        oscillation_score=score, reason="; ".join(reasons),
    )


def is_stable(losses: Sequence[float], **settings: Any) -> bool:
    """True when `assess_loss_curve(losses, **settings)` finds the curve stable."""
    return assess_loss_curve(losses, **settings).stable
