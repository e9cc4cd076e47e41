"""Tests of orchestrator/ray/searchers.py, driving the searcher by hand as Ray Tune would (no Ray cluster).

Run with `python -m pytest tests/test_searchers.py -q`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ray.tune.search import Searcher
from ray.tune.search.sample import Domain

from orchestrator.config.incremental import IncrementalBetaSettings
from orchestrator.ray.searchers import IncrementalBetaSearcher, grid_or_random_search_space

METRIC = "eval/preference_accuracy"
STABLE_LOSSES = [float(v) for v in 0.69 * np.exp(-np.arange(40) / 10) + 0.2]
OSCILLATING_LOSSES = [0.5 * (1 + 0.3 * (-1) ** step) for step in range(40)]


class TrialIds:
    """Unique trial ids, like Tune's."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"trial_{self.count:05d}"


def suggest_round(searcher: IncrementalBetaSearcher, new_id: TrialIds) -> dict[str, dict]:
    """Ask for suggestions until the searcher says "not now" (None) or FINISHED."""
    configs = {}
    while True:
        trial_id = new_id()
        config = searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return configs
        configs[trial_id] = config


def play_round(searcher, new_id, accuracy: float, losses: list[float] = STABLE_LOSSES) -> dict[str, dict]:
    """One round in which every trial reaches `accuracy` with loss curve `losses`."""
    configs = suggest_round(searcher, new_id)
    assert configs, "the searcher suggested nothing for a new round"
    for trial_id in configs:
        searcher.on_trial_complete(trial_id, {METRIC: accuracy, "loss_history": losses})
    return configs


def betas_of_rounds(searcher, new_id, outcomes) -> list[float]:
    betas = []
    for accuracy, losses in outcomes:
        configs = play_round(searcher, new_id, accuracy, losses)
        betas.append(next(iter(configs.values()))["beta"])
    return betas


@pytest.mark.parametrize(
    ("task", "start", "bounds"), [(None, 0.1, (0.05, 1.0)), ("simple", 0.5, (0.5, 1.0)), ("complex", 0.1, (0.1, 0.3))]
)
def test_first_round_starts_at_the_task_prior(task, start, bounds) -> None:
    searcher = IncrementalBetaSearcher(IncrementalBetaSettings(task=task))
    config = searcher.suggest("trial_1")
    assert config["beta"] == start and config["round"] == 1
    assert (searcher.settings.min_beta, searcher.settings.max_beta) == bounds
    assert f"start at beta {start:g}" in config["decision"]


def test_climbs_by_step_while_stable_and_improving() -> None:
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(step=0.1)), TrialIds()
    betas = betas_of_rounds(searcher, new_id, [(0.60, STABLE_LOSSES), (0.65, STABLE_LOSSES), (0.70, STABLE_LOSSES)])
    assert betas == [0.1, 0.2, 0.3]  # rounded: no 0.30000000000000004
    assert [entry["action"] for entry in searcher.decisions()] == ["climb"] * 3
    assert searcher.best["beta"] == 0.3 and searcher.best["metric"] == 0.70
    assert "climb -> beta 0.4" in searcher.suggest(new_id())["decision"]


def test_oscillating_loss_halves_the_step_and_never_climbs_back_to_the_failing_beta() -> None:
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(step=0.1)), TrialIds()
    betas = betas_of_rounds(
        searcher, new_id,
        [(0.60, STABLE_LOSSES), (0.65, STABLE_LOSSES), (0.72, OSCILLATING_LOSSES), (0.68, STABLE_LOSSES)],
    )
    assert betas == [0.1, 0.2, 0.3, 0.25]
    failing = searcher.decisions()[2]
    assert failing["oscillating"] and not failing["stable"] and failing["oscillation_score"] > 0.2
    assert failing["action"] == "back_off_halve_step" and failing["next_beta"] == 0.25
    last = searcher.decisions()[3]
    assert last["action"] == "stop" and "would reach the failing beta 0.3" in last["reason"]
    assert searcher.suggest(new_id()) == Searcher.FINISHED
    assert searcher.best["beta"] == 0.25  # the oscillating round's higher accuracy does not count


def test_raise_kl_weight_back_off_keeps_beta_and_multiplies_kl_weights() -> None:
    settings = IncrementalBetaSettings(backoff="raise_kl_weight", kl_weights=(0.0, 0.1), kl_weight_factor=2.0)
    searcher, new_id = IncrementalBetaSearcher(settings), TrialIds()
    play_round(searcher, new_id, 0.60)
    play_round(searcher, new_id, 0.66, OSCILLATING_LOSSES)  # beta 0.2 oscillates
    configs = suggest_round(searcher, new_id)
    assert {c["beta"] for c in configs.values()} == {0.2}
    assert sorted(c["kl_weight"] for c in configs.values()) == [0.01, 0.2]  # 0 * 2 -> min_raised_kl_weight
    assert searcher.decisions()[1]["action"] == "back_off_raise_kl_weight"


def test_metric_drop_backs_off_even_when_the_loss_is_stable() -> None:
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(step=0.2)), TrialIds()
    betas = betas_of_rounds(searcher, new_id, [(0.60, STABLE_LOSSES), (0.55, STABLE_LOSSES)])
    assert betas == [0.1, 0.3]
    dropped = searcher.decisions()[1]
    assert dropped["stable"] and dropped["action"] == "back_off_halve_step"
    assert "metric dropped below the best so far 0.6" in dropped["reason"]
    assert searcher.suggest(new_id())["beta"] == 0.2


def test_stops_after_patience_rounds_without_improvement() -> None:
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(patience=2)), TrialIds()
    betas_of_rounds(searcher, new_id, [(0.60, STABLE_LOSSES), (0.60, STABLE_LOSSES), (0.60, STABLE_LOSSES)])
    actions = [entry["action"] for entry in searcher.decisions()]
    assert actions == ["climb", "climb", "stop"]  # a stable plateau keeps climbing, but counts
    assert "2 rounds without improvement (patience 2)" in searcher.finish_reason
    assert searcher.suggest(new_id()) == Searcher.FINISHED


def test_stops_at_the_upper_bound_after_trying_it() -> None:
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(task="simple", step=0.2)), TrialIds()
    betas = betas_of_rounds(searcher, new_id, [(0.6 + 0.05 * i, STABLE_LOSSES) for i in range(4)])
    assert betas == [0.5, 0.7, 0.9, 1.0]
    assert "reached upper bound 1" in searcher.finish_reason
    assert searcher.suggest(new_id()) == Searcher.FINISHED


def test_fan_out_runs_every_pair_and_waits_for_the_whole_round() -> None:
    settings = IncrementalBetaSettings(learning_rates=(1e-4, 3e-4), kl_weights=(0.0, 0.1))
    searcher, new_id = IncrementalBetaSearcher(settings), TrialIds()
    configs = suggest_round(searcher, new_id)
    assert sorted((c["learning_rate"], c["kl_weight"]) for c in configs.values()) == [
        (1e-4, 0.0), (1e-4, 0.1), (3e-4, 0.0), (3e-4, 0.1)
    ]
    accuracy = {(1e-4, 0.0): 0.55, (1e-4, 0.1): 0.58, (3e-4, 0.0): 0.70, (3e-4, 0.1): 0.61}
    trial_ids = list(configs)
    for trial_id in trial_ids[:-1]:
        pair = (configs[trial_id]["learning_rate"], configs[trial_id]["kl_weight"])
        searcher.on_trial_complete(trial_id, {METRIC: accuracy[pair], "loss_history": STABLE_LOSSES})
        assert searcher.suggest(new_id()) is None  # the round is not over
    last = trial_ids[-1]
    searcher.on_trial_complete(last, {METRIC: 0.61, "loss_history": STABLE_LOSSES})
    entry = searcher.decisions()[0]
    assert entry["best_metric"] == 0.70 and len(entry["trials"]) == 4
    assert searcher.best["learning_rate"] == 3e-4 and searcher.best["kl_weight"] == 0.0
    assert len(suggest_round(searcher, new_id)) == 4


def test_the_best_trial_decides_stability_and_failed_trials_do_not_count() -> None:
    settings = IncrementalBetaSettings(learning_rates=(1e-4, 3e-4, 1e-3))
    searcher, new_id = IncrementalBetaSearcher(settings), TrialIds()
    first, second, third = suggest_round(searcher, new_id)
    searcher.on_trial_complete(first, {METRIC: 0.60, "loss_history": STABLE_LOSSES})
    searcher.on_trial_complete(second, {METRIC: 0.75, "loss_history": OSCILLATING_LOSSES})
    searcher.on_trial_complete(third, None, error=True)
    entry = searcher.decisions()[0]
    assert entry["best_trial_id"] == second and not entry["stable"]
    assert entry["action"] == "back_off_halve_step"


def test_a_round_without_a_finite_metric_is_unstable() -> None:
    searcher, new_id = IncrementalBetaSearcher(), TrialIds()
    play_round(searcher, new_id, math.nan)
    entry = searcher.decisions()[0]
    assert not entry["stable"] and "no trial reported a finite eval/preference_accuracy" in entry["reason"]


def test_loss_is_accumulated_from_reported_results_when_no_history_is_given() -> None:
    searcher, new_id = IncrementalBetaSearcher(), TrialIds()
    (trial_id,) = suggest_round(searcher, new_id)
    for iteration, loss in enumerate(OSCILLATING_LOSSES, start=1):
        searcher.on_trial_result(trial_id, {"train/loss": loss, "training_iteration": iteration})
    final = {"train/loss": OSCILLATING_LOSSES[-1], "training_iteration": 40, METRIC: 0.7}
    searcher.on_trial_complete(trial_id, final)  # Tune repeats the last result here
    entry = searcher.decisions()[0]
    assert entry["trials"][0]["loss_points"] == 40 and entry["oscillating"]


def test_decisions_are_complete_and_json_ready() -> None:
    searcher, new_id = IncrementalBetaSearcher(), TrialIds()
    play_round(searcher, new_id, 0.6)
    entry = searcher.decisions()[0]
    for key in ("round", "beta", "kl_weights", "learning_rates", "best_metric", "stable",
                "oscillation_score", "action", "reason", "next_beta"):
        assert key in entry, key
    assert json.loads(json.dumps(searcher.decisions())) == searcher.decisions()
    searcher.decisions()[0]["action"] = "edited"
    assert searcher.decisions()[0]["action"] == "climb"  # callers get a copy


def test_save_and_restore_mid_round_continues_identically(tmp_path) -> None:
    settings = IncrementalBetaSettings(learning_rates=(1e-4, 3e-4), step=0.2, backoff="raise_kl_weight")
    original, ids = IncrementalBetaSearcher(settings, metric="eval/win_rate"), TrialIds()
    configs = suggest_round(original, ids)
    for trial_id in configs:
        original.on_trial_complete(trial_id, {"eval/win_rate": 0.6, "loss_history": STABLE_LOSSES})
    first, second = suggest_round(original, ids)
    original.on_trial_complete(first, {"eval/win_rate": 0.7, "loss_history": STABLE_LOSSES})
    for iteration, loss in enumerate(OSCILLATING_LOSSES[:20], start=1):
        original.on_trial_result(second, {"train/loss": loss, "training_iteration": iteration})
    path = tmp_path / "searcher-state-test.json"
    original.save(str(path))
    json.loads(path.read_text())  # JSON, not pickle

    restored = IncrementalBetaSearcher()  # default settings: the saved ones must win
    restored.restore(str(path))
    assert restored.settings == settings and restored.metric == "eval/win_rate"
    for searcher in (original, restored):
        for iteration, loss in enumerate(OSCILLATING_LOSSES[20:], start=21):
            searcher.on_trial_result(second, {"train/loss": loss, "training_iteration": iteration})
        searcher.on_trial_complete(second, {"eval/win_rate": 0.72})
    assert restored.decisions() == original.decisions()
    assert restored.decisions()[-1]["oscillating"]
    assert suggest_round(restored, TrialIds()) == suggest_round(original, TrialIds())


def test_settings_are_validated_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="step"):
        IncrementalBetaSettings(step=0.5)
    with pytest.raises(ValueError, match="backoff"):
        IncrementalBetaSettings(backoff="lower_lr")
    with pytest.raises(ValueError, match="min_beta <= start_beta"):
        IncrementalBetaSettings(task="complex", start_beta=0.5)


def test_param_space_that_also_searches_beta_is_refused() -> None:
    searcher = IncrementalBetaSearcher()
    assert searcher.set_search_properties("eval/win_rate", "max", {"beta": 0.3, "seed": 1})
    assert searcher.metric == "eval/win_rate"
    with pytest.raises(ValueError, match="remove those keys"):
        searcher.set_search_properties(None, None, {"beta": {"grid_search": [0.1, 0.2]}})


def test_grid_and_random_search_spaces() -> None:
    grid = grid_or_random_search_space([0.1, 0.2], 0.0, [1e-4, 3e-4], "grid")
    assert grid == {"beta": {"grid_search": [0.1, 0.2]}, "kl_weight": 0.0,
                    "learning_rate": {"grid_search": [1e-4, 3e-4]}}
    learning_rate_range = {"min": 1e-5, "max": 1e-3, "log": True}
    space = grid_or_random_search_space({"min": 0.1, "max": 0.5}, [0.0, 0.1], learning_rate_range, "random")
    assert all(isinstance(space[name], Domain) for name in space)
    samples = [space["learning_rate"].sample() for _ in range(200)]
    assert 1e-5 <= min(samples) and max(samples) <= 1e-3
    assert sum(s < 1e-4 for s in samples) > 50  # log-uniform: half the mass below the geometric middle
    with pytest.raises(ValueError, match="strategy 'random'"):
        grid_or_random_search_space({"min": 0.1, "max": 0.5}, 0.0, 1e-4, "grid")
    with pytest.raises(ValueError, match="min < max"):
        grid_or_random_search_space({"min": 0.5, "max": 0.1}, 0.0, 1e-4, "random")
