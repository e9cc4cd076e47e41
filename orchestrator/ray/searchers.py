"""Beta searchers for Ray Tune: the incremental beta procedure (docs/method.md), and grid/random spaces.

`IncrementalBetaSearcher` tunes beta in rounds as docs/method.md describes ("start at 0.1, raise by
0.1-0.2 per round; when the loss oscillates or performance drops, lower beta or raise lambda"), on the
scale of the sweep's loss (orchestrator/config/incremental.py: beta_prior; 0.01 for ipo, 2 for simpo
and sigmoid_norm, with the bounds and the step scaled alike). A round trains one trial per
(learning_rate, kl_weight) pair at one beta, concurrently (the learning-rate fan-out); its result is
its best trial by the metric. A stable round (analysis/stability.py) that beats the best metric so
far climbs: beta += step. When the start round or the first climb from it fails (unstable, or the
metric dropped) and the back-off is "halve_step", the procedure explores downward on a geometric scale
(start x 0.5, 0.2, 0.1, 0.05: 0.1 -> 0.05, 0.02, 0.01, 0.005), where the published optima of DPO sit,
until the list is done or a lower beta stops improving after one that did. A later unstable or dropped
round backs off: beta -= step / 2 ("halve_step") or kl_weight *= kl_weight_factor ("raise_kl_weight"),
and never climbs to the failing beta again. It stops after `patience` rounds in a row without
improvement (outside the downward exploration), at the upper bound, when the next beta would reach a
failing one, when no untried beta is left, or after `max_rounds`. Every
decision is logged (`decisions()`); each suggested config carries its reason. Use it with
`tune.TuneConfig(search_alg=IncrementalBetaSearcher(...), num_samples=-1)`; its state is JSON and
survives `Tuner.restore`. Tested by `python -m pytest tests/test_searchers.py -q`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from typing import Any, Mapping

from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.sample import Domain

from analysis.stability import assess_loss_curve
from orchestrator.config.incremental import BETA_DECIMALS, IncrementalBetaSettings
from orchestrator.config.search_values import check_search_values
from orchestrator.tracking.schema import SEARCHED_PARAMS

def _number(value: Any) -> float | None:
    """A metric value as float (NaN and inf kept), or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class IncrementalBetaSearcher(Searcher):
    """Ray Tune searcher for the incremental beta procedure (see the module docstring)."""

    CKPT_FILE_TMPL = "searcher-state-{}.json"  # restore_from_dir looks for this name
    _STATE_FIELDS = (
        "round_number", "beta", "kl_weights", "decision", "handed_out", "round_trials",
        "finished_trials", "loss_values", "best", "tried_betas", "ceiling_beta",
        "non_improving_rounds", "finished", "finish_reason", "decision_log", "down_betas", "down_improved",
    )

    def __init__(
        self,
        settings: IncrementalBetaSettings | None = None,
        metric: str = "eval/preference_accuracy",
        mode: str = "max",
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.settings = settings or IncrementalBetaSettings()
        s = self.settings
        self.round_number = 1  # the round being suggested / run, counted from 1
        self.beta = s.start_beta  # this round's beta
        self.kl_weights = list(s.kl_weights)  # this round's kl_weights (raised by back-offs)
        self.decision = (
            f"round 1: start at beta {s.start_beta:g} (task prior {s.task!r}, "
            f"bounds {s.min_beta:g}-{s.max_beta:g}; step 1 of the DPO notes' tuning)"
        )
        self.handed_out = 0  # how many of this round's (learning_rate, kl_weight) pairs were suggested
        self.round_trials: dict[str, dict[str, Any]] = {}  # trial_id -> suggested config, this round
        self.finished_trials: dict[str, dict[str, Any]] = {}  # trial_id -> metric, losses, error
        self.loss_values: dict[str, list[list[float]]] = {}  # trial_id -> [[iteration, loss], ...]
        self.best: dict[str, Any] | None = None  # best stable round so far: beta, metric, trial, ...
        self.tried_betas: list[float] = [s.start_beta]
        self.ceiling_beta: float | None = None  # lowest beta that failed; never climbed to again
        self.non_improving_rounds = 0
        self.finished = False
        self.finish_reason = ""
        self.decision_log: list[dict[str, Any]] = []
        self.down_betas: list[float] | None = None  # downward exploration: the betas still to try (None: not begun)
        self.down_improved = False  # a round of the downward exploration improved on the best so far

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Take metric/mode from TuneConfig; refuse a param_space that also searches beta & co."""
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"IncrementalBetaSearcher: mode must be 'min' or 'max', got {mode!r}.")
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        searched = [
            key for key in SEARCHED_PARAMS
            if isinstance(config.get(key), Domain)
            or (isinstance(config.get(key), dict) and "grid_search" in config[key])
        ]
        if searched:
            raise ValueError(
                f"IncrementalBetaSearcher chooses {', '.join(searched)} itself, but the param_space "
                f"also searches them; remove those keys from param_space (plain values are overridden)."
            )
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next trial of this round; None while the round's trials run; FINISHED when done."""
        if self.finished:
            return Searcher.FINISHED
        pairs = self._round_pairs()
        if self.handed_out >= len(pairs):
            return None
        learning_rate, kl_weight = pairs[self.handed_out]
        self.handed_out += 1
        config = {
            "beta": self.beta, "kl_weight": kl_weight, "learning_rate": learning_rate,
            "round": self.round_number, "decision": self.decision,
        }
        self.round_trials[trial_id] = config
        return dict(config)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Accumulate the trial's reported loss (NaN kept: a non-finite loss is a verdict)."""
        loss = _number(result.get(self.settings.loss_key))
        if trial_id not in self.round_trials or loss is None:
            return
        history = self.loss_values.setdefault(trial_id, [])
        iteration = _number(result.get("training_iteration"))
        iteration = len(history) + 1.0 if iteration is None else iteration
        # A trial restarted after a failure or Tuner.restore reports old iterations again: cut back.
        history[:] = [point for point in history if point[0] < iteration]
        history.append([iteration, loss])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Record the trial's final metric and loss curve; close the round after its last trial."""
        if trial_id not in self.round_trials or trial_id in self.finished_trials:
            return
        result = result or {}
        if isinstance(result.get(self.settings.loss_history_key), (list, tuple)):
            losses = [float(v) for v in result[self.settings.loss_history_key]]
        else:
            losses = self._accumulated_losses(trial_id, result)
        self.finished_trials[trial_id] = {
            "metric": None if error else self._read_metric(result), "losses": losses, "error": bool(error),
        }
        if len(self.finished_trials) == len(self._round_pairs()):
            self._close_round()

    def get_state(self) -> dict[str, Any]:  # JSON-ready: plain dicts, lists, floats, strings
        state = {name: copy.deepcopy(getattr(self, name)) for name in self._STATE_FIELDS}
        state.update(settings=asdict(self.settings), metric=self._metric, mode=self._mode)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        settings = dict(state["settings"])
        for name in ("learning_rates", "kl_weights"):
            settings[name] = tuple(settings[name])
        self.settings = IncrementalBetaSettings(**settings)
        self._metric, self._mode = state["metric"], state["mode"]
        for name in self._STATE_FIELDS:
            setattr(self, name, copy.deepcopy(state[name]))

    def save(self, checkpoint_path: str) -> None:
        """Write the state as JSON (called by Tune on every experiment checkpoint)."""
        with open(checkpoint_path, "w", encoding="utf-8") as handle:
            json.dump(self.get_state(), handle, indent=1)

    def restore(self, checkpoint_path: str) -> None:
        """Load a state written by `save` (Tuner.restore calls this through restore_from_dir)."""
        try:
            with open(checkpoint_path, encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"IncrementalBetaSearcher.restore: cannot read searcher state {checkpoint_path!r} "
                f"({exc}); it must be a JSON file written by IncrementalBetaSearcher.save."
            ) from exc
        self.set_state(state)

    def decisions(self) -> list[dict[str, Any]]:
        """A copy of the decision log: one entry per finished round."""
        return copy.deepcopy(self.decision_log)

    def _round_pairs(self) -> list[tuple[float, float]]:
        return [(lr, kw) for lr in self.settings.learning_rates for kw in self.kl_weights]

    def _read_metric(self, result: Mapping[str, Any]) -> float | None:
        if self._metric in result:
            return _number(result[self._metric])
        node: Any = result  # a nested (unflattened) result: {"eval": {"preference_accuracy": ...}}
        for part in self._metric.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return _number(node)

    def _accumulated_losses(self, trial_id: str, final_result: Mapping[str, Any]) -> list[float]:
        history = list(self.loss_values.get(trial_id, []))
        final_loss = _number(final_result.get(self.settings.loss_key))
        final_iteration = _number(final_result.get("training_iteration"))
        # The final result is usually the last one on_trial_result already saw; add it only if newer.
        if final_loss is not None and (
            not history if final_iteration is None else (not history or final_iteration > history[-1][0])
        ):
            history.append([len(history) + 1.0 if final_iteration is None else final_iteration, final_loss])
        return [loss for _, loss in history]

    def _is_better(self, metric: float, reference: float, margin: float) -> bool:
        return metric > reference + margin if self._mode == "max" else metric < reference - margin

    def _close_round(self) -> None:
        s = self.settings
        trials = []
        for trial_id, config in self.round_trials.items():
            outcome = self.finished_trials[trial_id]
            trials.append({"trial_id": trial_id, "learning_rate": config["learning_rate"],
                           "kl_weight": config["kl_weight"], "metric": outcome["metric"],
                           "error": outcome["error"], "loss_points": len(outcome["losses"])})
        scored = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
        entry: dict[str, Any] = {
            "round": self.round_number, "beta": self.beta, "kl_weights": list(self.kl_weights),
            "learning_rates": list(s.learning_rates), "metric": self._metric, "trials": trials,
            "best_trial_id": None, "best_metric": None, "stable": False, "oscillating": None,
            "diverging": None, "non_finite": None, "oscillation_score": None,
        }
        if not scored:
            stable, why = False, f"no trial reported a finite {self._metric}"
        else:
            best_trial = scored[0]
            for trial in scored[1:]:
                if self._is_better(trial["metric"], best_trial["metric"], 0.0):
                    best_trial = trial
            losses = self.finished_trials[best_trial["trial_id"]]["losses"]
            report = assess_loss_curve(
                losses, window=s.stability_window, oscillation_threshold=s.oscillation_threshold,
                divergence_ratio=s.divergence_ratio,
            )
            entry.update({key: value for key, value in report.as_dict().items() if key != "reason"})
            entry.update(best_trial_id=best_trial["trial_id"], best_metric=best_trial["metric"])
            stable = report.stable
            why = report.reason if losses else f"no {s.loss_key} values reported; stability not checked"
        entry["stability_reason"] = why
        metric = entry["best_metric"]
        best_so_far = None if self.best is None else self.best["metric"]
        improved = stable and (best_so_far is None or self._is_better(metric, best_so_far, s.min_improvement))
        dropped = metric is not None and best_so_far is not None and self._is_better(best_so_far, metric, 0.0)
        seen = f"round {self.round_number} at beta {self.beta:g}: {self._metric} = {metric}, {why}"

        next_beta: float | None = self.beta
        earlier = "no earlier round" if best_so_far is None else f"the best so far {best_so_far:g}"
        failed = not stable or dropped
        exploring = self.down_betas is not None
        if improved:
            best_config = self.round_trials[entry["best_trial_id"]]
            self.best = {"beta": self.beta, "metric": metric, "trial_id": entry["best_trial_id"],
                         "learning_rate": best_config["learning_rate"], "kl_weight": best_config["kl_weight"],
                         "round": self.round_number}
            self.non_improving_rounds = 0
        else:
            self.non_improving_rounds += 1
        if exploring:
            action, next_beta, reason = self._explore_down(seen, improved, earlier)
        elif failed and self._first_climb() and s.explore_down and s.backoff == "halve_step" and s.downward_betas():
            self.ceiling_beta = self.beta if self.ceiling_beta is None else min(self.ceiling_beta, self.beta)
            self.down_betas = [beta for beta in s.downward_betas() if beta not in self.tried_betas]
            cause = "unstable" if not stable else f"metric dropped below {earlier}"
            action, next_beta, reason = self._explore_down(f"{seen}; {cause} on the first climb from the start "
                                                           f"{s.start_beta:g}", False, earlier)
        elif improved:
            action, next_beta, reason = self._climb(f"{seen}; improved on {earlier}")
        elif failed:
            cause = "unstable" if not stable else f"metric dropped below {earlier}"
            self.ceiling_beta = self.beta if self.ceiling_beta is None else min(self.ceiling_beta, self.beta)
            action, next_beta, reason = self._back_off(f"{seen}; {cause}")
        else:
            action, next_beta, reason = self._climb(f"{seen}; stable but no improvement on {earlier}")
        # patience does not cut the downward exploration short: it runs its list (or stops on its own rule)
        if action != "stop" and self.down_betas is None and self.non_improving_rounds >= s.patience:
            action = "stop"
            reason = f"{seen}; {self.non_improving_rounds} rounds without improvement (patience {s.patience})"
        if action != "stop" and self.round_number >= s.max_rounds:
            action, reason = "stop", f"{seen}; reached max_rounds {s.max_rounds}"
        entry.update(action=action, reason=reason, next_beta=None if action == "stop" else next_beta,
                     next_kl_weights=None if action == "stop" else list(self.kl_weights))
        self.decision_log.append(entry)
        if action == "stop":
            self.finished, self.finish_reason = True, reason
            return
        self.round_number += 1
        self.beta = next_beta
        if next_beta not in self.tried_betas:
            self.tried_betas.append(next_beta)
        self.decision = f"round {self.round_number}: {action} -> beta {next_beta:g}; {reason}"
        self.handed_out, self.round_trials, self.finished_trials, self.loss_values = 0, {}, {}, {}

    def _first_climb(self) -> bool:
        """This round is the start round, or the first climb from it (round 2 after round 1 climbed)."""
        if self.round_number == 1:
            return True
        return self.round_number == 2 and self.decision_log[-1]["action"] == "climb"

    def _explore_down(self, seen: str, improved: bool, earlier: str) -> tuple[str, float | None, str]:
        """The downward exploration: the next beta of start * DOWNWARD_FACTORS, until the list is done or a
        lower beta, after one that improved, no longer does (the optimum is then bracketed)."""
        if self.down_improved and not improved:
            return "stop", None, (f"{seen}; no improvement on {earlier} one step further down: the best beta "
                                  f"{self.best['beta']:g} is bracketed, downward exploration done")
        self.down_improved = self.down_improved or improved
        if not self.down_betas:
            best = "no stable round" if self.best is None else f"best beta {self.best['beta']:g}"
            return "stop", None, f"{seen}; downward exploration reached {self.settings.min_beta:g} ({best})"
        target = self.down_betas.pop(0)
        remaining = ", ".join(f"{beta:g}" for beta in self.down_betas) or "none"
        verdict = "improved" if improved else "explore downward"
        return "explore_down", target, f"{seen}; {verdict}: try beta {target:g} (then {remaining})"

    def _climb(self, seen: str) -> tuple[str, float | None, str]:
        s = self.settings
        target = round(self.beta + s.beta_step, BETA_DECIMALS)
        if self.ceiling_beta is not None and target >= self.ceiling_beta:
            return "stop", None, f"{seen}; the next beta {target:g} would reach the failing beta {self.ceiling_beta:g}"
        if target > s.max_beta:
            if self.beta < s.max_beta and s.max_beta not in self.tried_betas:
                return "climb", s.max_beta, f"{seen}; climb to the upper bound {s.max_beta:g}"
            return "stop", None, f"{seen}; reached upper bound {s.max_beta:g}"
        return "climb", target, f"{seen}; climb by step {s.beta_step:g}"

    def _back_off(self, seen: str) -> tuple[str, float | None, str]:
        s = self.settings
        if s.backoff == "raise_kl_weight":
            self.kl_weights = [
                round(max(kl_weight * s.kl_weight_factor, s.min_raised_kl_weight), 12) for kl_weight in self.kl_weights
            ]
            return "back_off_raise_kl_weight", self.beta, f"{seen}; keep beta, raise kl_weights to {self.kl_weights}"
        target = round(max(self.beta - s.beta_step / 2, s.min_beta), BETA_DECIMALS)
        if target in self.tried_betas:
            return "stop", None, (
                f"{seen}; back-off target {target:g} (half a step down, lower bound {s.min_beta:g}) was already "
                f"tried; nothing left to try (backoff='raise_kl_weight' or a lower min_beta would continue)"
            )
        return "back_off_halve_step", target, f"{seen}; lower beta by half a step to {target:g}"


def grid_or_random_search_space(
    beta: Any, kl_weight: Any, learning_rate: Any, strategy: str, loss: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """A Tune param_space for beta, kl_weight, learning_rate (and the loss) from plain values.

    Each number argument is a number (fixed), a list of values (grid: tune.grid_search; random:
    tune.choice), or, for strategy "random" only, a range {"min": a, "max": b, "log": bool}
    (tune.loguniform when log is true, else tune.uniform). The values are checked by the same rule
    the config applies (orchestrator/config/search_values.py). loss: the names of sweep.loss, a
    categorical dimension (grid: every name; random/optuna: a choice); with it, beta None leaves beta out
    of the space, and each trial takes its loss's prior beta (RunSpec.for_trial).
    """
    if strategy not in ("grid", "random"):
        raise ValueError(f"grid_or_random_search_space: strategy must be 'grid' or 'random', got {strategy!r}.")
    space: dict[str, Any] = {}
    if loss is not None:
        names = [str(name) for name in loss]
        if not names:
            raise ValueError("grid_or_random_search_space: loss needs at least one name")
        space["loss"] = tune.grid_search(names) if strategy == "grid" else tune.choice(names)
    for name, value in (("beta", beta), ("kl_weight", kl_weight), ("learning_rate", learning_rate)):
        if name == "beta" and value is None and loss is not None:
            continue  # each loss's own prior beta
        check_search_values(name, value, strategy)
        if isinstance(value, Mapping):
            low, high = float(value["min"]), float(value["max"])
            space[name] = tune.loguniform(low, high) if value.get("log", False) else tune.uniform(low, high)
        elif isinstance(value, (list, tuple)):
            values = [float(v) for v in value]
            space[name] = tune.grid_search(values) if strategy == "grid" else tune.choice(values)
        else:
            space[name] = float(value)
    return space
