"""Tests of analysis/stability.py: the verdicts on synthetic loss curves a user would recognise.

Run with `python -m pytest tests/test_stability.py -q`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stability import assess_loss_curve, is_stable, non_increasing_fit, oscillation_score

STEPS = np.arange(100)


def smooth_decrease() -> list[float]:
    return list(0.69 * np.exp(-STEPS / 25) + 0.1)


def noisy_plateau(relative_noise: float = 0.02, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(0.5 * (1 + relative_noise * rng.standard_normal(len(STEPS))))


def zig_zag(relative_amplitude: float = 0.3) -> list[float]:
    return list(0.5 * (1 + relative_amplitude * (-1.0) ** STEPS))


def large_sine(period: int = 20) -> list[float]:
    return list(0.5 * (1 + 0.3 * np.sin(2 * np.pi * STEPS / period)))


def test_smooth_decrease_is_stable() -> None:
    report = assess_loss_curve(smooth_decrease())
    assert report.stable and not report.oscillating and not report.diverging and not report.non_finite
    assert report.oscillation_score == pytest.approx(0.0, abs=1e-9)
    assert report.reason.startswith("stable")


@pytest.mark.parametrize("seed", range(5))
def test_noisy_plateau_is_stable_not_oscillating(seed: int) -> None:
    report = assess_loss_curve(noisy_plateau(0.02, seed))
    assert report.stable, report.reason
    assert report.oscillation_score < 0.02


def test_ten_percent_noise_on_a_decreasing_curve_is_still_stable() -> None:
    rng = np.random.default_rng(1)
    curve = (0.6 * np.exp(-STEPS / 25) + 0.1) * (1 + 0.10 * rng.standard_normal(len(STEPS)))
    assert is_stable(list(curve))


def test_zig_zag_oscillates() -> None:
    report = assess_loss_curve(zig_zag(0.3))
    assert report.oscillating and not report.stable and not report.diverging
    assert report.oscillation_score == pytest.approx(0.29, abs=0.02)  # std 0.3 * |lag-1 autocorr| ~ 1
    assert "oscillating" in report.reason


@pytest.mark.parametrize("period", [4, 20, 50])
def test_large_sine_oscillates_at_fast_and_slow_periods(period: int) -> None:
    report = assess_loss_curve(large_sine(period))
    assert report.oscillating and not report.stable, report


def test_oscillation_on_top_of_a_decrease_is_detected() -> None:
    curve = 0.6 * np.exp(-STEPS / 30) + 0.1 + 0.1 * np.sin(2 * np.pi * STEPS / 12)
    assert assess_loss_curve(list(curve)).oscillating


def test_rising_curve_diverges_without_being_called_oscillating() -> None:
    report = assess_loss_curve(list(0.5 + 0.02 * STEPS))
    assert report.diverging and not report.stable and not report.oscillating
    assert "above its start" in report.reason


def test_curve_that_ends_far_above_its_minimum_diverges() -> None:
    falling = 0.7 * np.exp(-STEPS[:60] / 10) + 0.05  # down to about 0.05
    rising = np.linspace(0.05, 0.4, 40)  # back up to 0.4, still below the start 0.75
    report = assess_loss_curve(list(np.concatenate([falling, rising])))
    assert report.diverging and not report.stable
    assert "minimum" in report.reason


def test_a_loss_near_zero_with_a_tiny_rise_is_not_diverging() -> None:
    curve = list(0.69 * np.exp(-STEPS / 10) + 0.01)
    curve[-10:] = [0.02] * 10  # doubles from 0.01, but by 1.5 % of the start
    assert assess_loss_curve(curve).stable


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_is_never_stable(bad_value: float) -> None:
    curve = smooth_decrease()
    curve[37] = bad_value
    report = assess_loss_curve(curve)
    assert report.non_finite and not report.stable
    assert "index 37" in report.reason


def test_too_short_curve_is_assumed_stable_and_says_so() -> None:
    report = assess_loss_curve([0.7, 0.6, 0.65])
    assert report.stable and "need >= 8" in report.reason


def test_thresholds_change_the_verdict() -> None:
    curve = zig_zag(0.1)  # score about 0.1
    assert not is_stable(curve)
    assert is_stable(curve, oscillation_threshold=0.2)


def test_invalid_settings_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="divergence_ratio"):
        assess_loss_curve(smooth_decrease(), divergence_ratio=1.0)
    with pytest.raises(ValueError, match="window"):
        assess_loss_curve(smooth_decrease(), window=0)


def test_non_increasing_fit_pools_violations() -> None:
    fitted = non_increasing_fit(np.array([3.0, 1.0, 2.0, 0.0]))
    assert fitted.tolist() == [3.0, 1.5, 1.5, 0.0]
    assert oscillation_score([1.0, 1.0, 1.0, 1.0]) == 0.0
