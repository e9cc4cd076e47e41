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
    ("task", "start", "bounds"), [(None, 0.1, (0.005, 1.0)), ("simple", 0.5, (0.5, 1.0)), ("complex", 0.1, (0.1, 0.3))]
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
    betas = betas_of_rounds(searcher, new_id, [(0.60, STABLE_LOSSES), (0.65, STABLE_LOSSES), (0.55, STABLE_LOSSES)])
    assert betas == [0.1, 0.3, 0.5]
    dropped = searcher.decisions()[2]
    assert dropped["stable"] and dropped["action"] == "back_off_halve_step"  # a later climb: half a step back
    assert "metric dropped below the best so far 0.65" in dropped["reason"]
    assert searcher.suggest(new_id())["beta"] == 0.4


def test_a_failed_first_climb_explores_downward_geometrically_to_the_end() -> None:
    """0.1 -> 0.2 drops: 0.05, 0.02, 0.01, 0.005 are tried in turn (each improving), then it stops."""
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(patience=1)), TrialIds()
    outcomes = [(0.60, STABLE_LOSSES), (0.55, STABLE_LOSSES)] + [(0.61 + 0.01 * i, STABLE_LOSSES) for i in range(4)]
    betas = betas_of_rounds(searcher, new_id, outcomes)
    assert betas == [0.1, 0.2, 0.05, 0.02, 0.01, 0.005]  # patience 1 does not cut the exploration short
    actions = [entry["action"] for entry in searcher.decisions()]
    assert actions == ["climb", "explore_down", "explore_down", "explore_down", "explore_down", "stop"]
    assert "on the first climb from the start 0.1" in searcher.decisions()[1]["reason"]
    assert "then 0.02, 0.01, 0.005" in searcher.decisions()[1]["reason"]
    assert "downward exploration reached 0.005 (best beta 0.005)" in searcher.finish_reason
    assert searcher.best["beta"] == 0.005 and searcher.suggest(new_id()) == Searcher.FINISHED


def test_downward_exploration_stops_once_the_optimum_is_bracketed() -> None:
    """0.02 improves on 0.1, 0.01 does not: the best (0.02) lies between; no need to try 0.005."""
    searcher, new_id = IncrementalBetaSearcher(), TrialIds()
    outcomes = [(0.60, STABLE_LOSSES), (0.50, OSCILLATING_LOSSES), (0.58, STABLE_LOSSES), (0.66, STABLE_LOSSES),
                (0.64, STABLE_LOSSES)]
    betas = betas_of_rounds(searcher, new_id, outcomes)
    assert betas == [0.1, 0.2, 0.05, 0.02, 0.01]
    assert "unstable on the first climb" in searcher.decisions()[1]["reason"]
    assert "explore downward: try beta 0.02" in searcher.decisions()[2]["reason"]  # 0.05 did not improve: go on
    assert "improved: try beta 0.01" in searcher.decisions()[3]["reason"]
    assert searcher.decisions()[4]["action"] == "stop" and "0.02 is bracketed" in searcher.finish_reason
    assert searcher.best["beta"] == 0.02


def test_an_unstable_start_round_explores_downward_and_respects_min_beta() -> None:
    settings = IncrementalBetaSettings(min_beta=0.02)
    searcher, new_id = IncrementalBetaSearcher(settings), TrialIds()
    betas = betas_of_rounds(searcher, new_id, [(0.6, OSCILLATING_LOSSES), (0.55, OSCILLATING_LOSSES),
                                               (0.57, STABLE_LOSSES)])
    assert betas == [0.1, 0.05, 0.02]  # 0.01 and 0.005 lie below min_beta
    assert searcher.decisions()[0]["action"] == "explore_down"
    assert "downward exploration reached 0.02 (best beta 0.02)" in searcher.finish_reason


def test_no_downward_exploration_when_switched_off_or_raising_kl_weight() -> None:
    off = IncrementalBetaSearcher(IncrementalBetaSettings(explore_down=False, step=0.2))
    new_id = TrialIds()
    assert betas_of_rounds(off, new_id, [(0.60, STABLE_LOSSES), (0.55, STABLE_LOSSES)]) == [0.1, 0.3]
    assert off.decisions()[1]["action"] == "back_off_halve_step" and off.suggest(new_id())["beta"] == 0.2
    raising = IncrementalBetaSearcher(IncrementalBetaSettings(backoff="raise_kl_weight"))
    betas_of_rounds(raising, new_id, [(0.60, STABLE_LOSSES), (0.55, STABLE_LOSSES)])
    assert raising.decisions()[1]["action"] == "back_off_raise_kl_weight"


def test_max_rounds_ends_a_downward_exploration() -> None:
    searcher, new_id = IncrementalBetaSearcher(IncrementalBetaSettings(max_rounds=3)), TrialIds()
    betas_of_rounds(searcher, new_id, [(0.60, STABLE_LOSSES), (0.55, STABLE_LOSSES), (0.61, STABLE_LOSSES)])
    assert searcher.decisions()[2]["action"] == "stop" and "reached max_rounds 3" in searcher.finish_reason


@pytest.mark.parametrize(("loss", "start", "step", "down"), [
    ("sigmoid", 0.1, 0.1, [0.05, 0.02, 0.01, 0.005]),
    ("ipo", 0.01, 0.01, [0.005, 0.002, 0.001, 0.0005]),
    ("simpo", 2.0, 2.0, [1.0, 0.4, 0.2, 0.1]),
    (("sigmoid_norm", "sft"), 2.0, 2.0, [1.0, 0.4, 0.2, 0.1]),
    (("sft", "ipo"), 0.01, 0.01, [0.005, 0.002, 0.001, 0.0005]),
])
def test_per_loss_beta_priors_scale_the_start_bounds_and_step(loss, start, step, down) -> None:
    from orchestrator.config.incremental import SIGMOID_SCALE, beta_prior

    settings = IncrementalBetaSettings(beta_scale=beta_prior(loss) / SIGMOID_SCALE)
    assert (settings.start_beta, settings.beta_step, settings.downward_betas()) == (start, step, down)
    assert settings.max_beta == pytest.approx(10 * start)
    searcher, new_id = IncrementalBetaSearcher(settings), TrialIds()
    assert betas_of_rounds(searcher, new_id, [(0.6, STABLE_LOSSES), (0.7, STABLE_LOSSES)]) == [start, start + step]
    assert searcher.decisions()[0]["reason"].endswith(f"climb by step {step:g}")


def test_downward_state_survives_save_and_restore(tmp_path) -> None:
    searcher, new_id = IncrementalBetaSearcher(), TrialIds()
    betas_of_rounds(searcher, new_id, [(0.60, STABLE_LOSSES), (0.55, STABLE_LOSSES)])
    path = tmp_path / "state.json"
    searcher.save(str(path))
    restored = IncrementalBetaSearcher()
    restored.restore(str(path))
    assert restored.down_betas == [0.02, 0.01, 0.005] and restored.beta == 0.05
    assert betas_of_rounds(restored, new_id, [(0.61, STABLE_LOSSES), (0.62, STABLE_LOSSES)]) == [0.05, 0.02]


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
    assert entry["action"] == "explore_down"  # the start round failed: downward, 0.1 -> 0.05


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


def test_loss_is_a_categorical_dimension_of_grid_random_and_optuna_spaces() -> None:
    grid = grid_or_random_search_space(None, 0.0, 1e-4, "grid", loss=("sigmoid", "ipo", "sigmoid_norm"))
    assert grid == {"loss": {"grid_search": ["sigmoid", "ipo", "sigmoid_norm"]}, "kl_weight": 0.0, "learning_rate": 1e-4}
    with_beta = grid_or_random_search_space([0.1, 0.2], 0.0, 1e-4, "grid", loss=("sigmoid", "ipo"))
    assert with_beta["beta"] == {"grid_search": [0.1, 0.2]}  # given betas are crossed with every loss
    random = grid_or_random_search_space(None, 0.0, 1e-4, "random", loss=("sigmoid", "simpo"))
    assert isinstance(random["loss"], Domain) and "beta" not in random
    assert {random["loss"].sample() for _ in range(50)} == {"sigmoid", "simpo"}
    with pytest.raises(ValueError, match="null is not a finite number"):
        grid_or_random_search_space(None, 0.0, 1e-4, "grid")  # no loss dimension: beta is required
    optuna = pytest.importorskip("ray.tune.search.optuna")
    converted = optuna.OptunaSearch.convert_search_space(random)
    assert set(converted["loss"].choices) == {"sigmoid", "simpo"}  # an optuna categorical


def sweep_config(tmp_path, **sweep):
    from orchestrator.config.schema import ExperimentConfig

    return ExperimentConfig.model_validate({"name": "s", "model": {"path": str(tmp_path)}, "data": {"train": "t.jsonl"},
                                            "sweep": sweep})


def test_sweep_loss_trials_take_their_loss_prior_beta_and_reference(tmp_path) -> None:
    from orchestrator.config.spec import resolve_experiment

    config = sweep_config(tmp_path, strategy="grid", loss=["sigmoid", "ipo", "simpo"])
    experiment = resolve_experiment(config)
    assert experiment.sweep.loss == ("sigmoid", "ipo", "simpo") and experiment.sweep.beta is None
    assert config.reference.mode == "precomputed"  # sigmoid and ipo need the reference cache
    by_loss = {name: experiment.run.for_trial({"loss": name, "learning_rate": 1e-3}) for name in ("sigmoid", "ipo", "simpo")}
    assert {name: spec.preference.beta for name, spec in by_loss.items()} == {"sigmoid": 0.1, "ipo": 0.01, "simpo": 2.0}
    assert by_loss["simpo"].preference.reference_mode == "none" and by_loss["ipo"].preference.reference_mode == "precomputed"
    params = by_loss["ipo"].param_dict()
    assert (params["dpo.loss"], params["dpo.beta"], params["train.learning_rate"]) == ("ipo", 0.01, 1e-3)
    assert experiment.run.for_trial({"loss": "ipo", "beta": 0.3}).preference.beta == 0.3  # searched beta wins


@pytest.mark.parametrize(("sweep", "message"), [
    (dict(strategy="incremental_beta", loss=["sigmoid", "ipo"]), "keeps the loss fixed per sweep"),
    (dict(strategy="grid", loss=[]), "non-empty list of distinct"),
    (dict(strategy="grid", loss=["sigmoid", "sigmoid"]), "non-empty list of distinct"),
    (dict(strategy="grid", loss=["sigmoid", "dpo"]), "sweep.loss: 'dpo' with the dpo.* options: dpo.loss: unknown"),
    (dict(strategy="grid", loss=["cdpo"]), "sweep.loss: 'cdpo'.*label_smoothing"),
])
def test_bad_sweep_loss_is_refused_naming_the_key(tmp_path, sweep, message) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        sweep_config(tmp_path, **sweep)


def test_incremental_sweep_starts_at_its_loss_prior(tmp_path) -> None:
    from orchestrator.config.spec import resolve_experiment

    config = sweep_config(tmp_path)
    config.dpo.loss = "sigmoid_norm"
    settings = resolve_experiment(config).sweep.incremental
    assert (settings.start_beta, settings.beta_step, settings.min_beta, settings.max_beta) == (2.0, 2.0, 0.1, 20.0)
