"""The rule that picks beta (with its kl_weight and learning rate) from a sweep's trial table.

A pure function of the table `analysis.runs.load_sweep(...).trials` (one row per trial), so it is
unit-tested on hand-made DataFrames and used the same way by `dpo analyze` and notebooks:

    from analysis.selection import SelectionRule, select_trial
    selection = select_trial(sweep.trials, SelectionRule(kl_budget=50))
    print(selection.reason, selection.runner_up_reason)

The rule, in order (every excluded trial gets its reason in `selection.table["excluded_because"]`):
1. Only runs of `stage` (default `dpo`) that ended FINISHED take part (in a study, only `arm` if set).
2. The score is the final value of `metric`: with `auto`, `eval/win_rate` (then `bench/win_rate`) when
   some trial logged it, else `eval/preference_accuracy`. A trial without a finite score is out.
3. Training must be stable: the `train/loss` curve neither oscillates nor diverges (analysis/stability.py)
   and no loss value is NaN or inf.
4. KL budget: the largest value the `kl_metric` curve reached (default `eval/kl`, the exact per-token
   KL(pi || pi_ref) on the held-out answers, in nats per token) must be <= `kl_budget` (default
   DEFAULT_KL_BUDGET, 5 nats per token; `train/kl`, the penalty's k2 value, also works). `kl_budget: None`
   disables the check; a trial that logged no KL (a reference-free loss) is kept, with a note.
5. Benchmarks: for every `bench_delta/<name>`, the loss against the starting model, as a fraction of
   the starting score (`bench/<name> - bench_delta/<name>`; the absolute change when that is unknown),
   must stay <= `benchmark_tolerance`. Higher is better unless the name says loss/perplexity/kl.
6. Among the remaining trials, the best score wins, except that every trial within `tie_tolerance` of
   it counts as tied and the tie goes to the smallest beta (the policy closest to the reference), then
   to the higher score. The runner-up is what the same rule picks once the winner is removed.
Tested by `python -m pytest tests/test_analysis.py -q`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from analysis.runs import lower_is_better
from orchestrator.tracking.schema import BENCH_DELTA_PREFIX, BENCH_PREFIX, DEFAULT_SCORE_METRIC, KL_METRIC, WIN_RATE_METRIC

AUTO_METRIC = "auto"
AUTO_METRIC_ORDER = (WIN_RATE_METRIC, f"{BENCH_PREFIX}win_rate", DEFAULT_SCORE_METRIC)
DEFAULT_KL_METRIC = KL_METRIC
# eval/kl is the exact KL(pi || pi_ref) per held-out answer token (trainables/dpo_objective.py), a bounded,
# comparable number: a trial whose policy moved more than this many nats per token from the reference is out.
DEFAULT_KL_BUDGET: float | None = 5.0
DEFAULT_BENCHMARK_TOLERANCE = 0.05  # 5 % of the starting score
DEFAULT_TIE_TOLERANCE = 0.01  # 1 point of accuracy / win rate


@dataclass(frozen=True)
class SelectionRule:
    """Settings of the beta-selection rule (module docstring); every field is a `dpo analyze` option."""

    metric: str = AUTO_METRIC  # the score to maximise; auto: win rate when present, else eval/preference_accuracy
    kl_metric: str = DEFAULT_KL_METRIC  # the KL curve the budget applies to
    kl_budget: float | None = DEFAULT_KL_BUDGET  # largest KL a trial may reach; None: no budget
    benchmark_tolerance: float = DEFAULT_BENCHMARK_TOLERANCE  # largest relative benchmark regression
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE  # scores this close to the best are tied; smaller beta wins
    stage: str | None = "dpo"  # only runs tagged dpo.stage=<stage> (None: every stage)
    arm: str | None = None  # a study's arm (dpo.arm, e.g. sft_then_dpo); None: every trial

    def __post_init__(self) -> None:
        problems = []
        if self.kl_budget is not None and not self.kl_budget > 0:
            problems.append(f"kl_budget must be > 0 or None (got {self.kl_budget})")
        if self.benchmark_tolerance < 0:
            problems.append(f"benchmark_tolerance must be >= 0 (got {self.benchmark_tolerance})")
        if self.tie_tolerance < 0:
            problems.append(f"tie_tolerance must be >= 0 (got {self.tie_tolerance})")
        if problems:
            raise ValueError("SelectionRule: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Selection:
    """The rule's verdict: the chosen trial and the runner-up (table rows as dicts), in words and in full."""

    metric: str  # the score actually used (auto resolved)
    rule: SelectionRule
    chosen: dict[str, Any] | None  # None when no trial passes the rule
    runner_up: dict[str, Any] | None
    reason: str  # why the chosen trial won (or why none could)
    runner_up_reason: str
    table: pd.DataFrame  # the input rows plus score, kl_peak, eligible, excluded_because, notes

    def summary(self) -> dict[str, Any]:
        """Plain JSON-ready values (selection.json, MLflow tags)."""
        keep = ("trial_id", "run_id", "beta", "kl_weight", "learning_rate", "score", "kl_peak")
        pick = lambda row: {key: _plain(row.get(key)) for key in keep} if row else None
        return {"metric": self.metric, "rule": self.rule.as_dict(), "chosen": pick(self.chosen),
                "runner_up": pick(self.runner_up), "reason": self.reason, "runner_up_reason": self.runner_up_reason}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_metric(table: pd.DataFrame, metric: str) -> str:
    """`auto` -> the first of eval/win_rate, bench/win_rate, eval/preference_accuracy some trial logged."""
    if metric != AUTO_METRIC:
        return metric
    for candidate in AUTO_METRIC_ORDER:
        if candidate in table.columns and table[candidate].map(_finite).any():
            return candidate
    return AUTO_METRIC_ORDER[-1]


def benchmark_regressions(row: dict[str, Any]) -> dict[str, float]:
    """{benchmark: regression as a fraction of its starting score (absolute change without one); > 0 is worse}."""
    regressions = {}
    for key, delta in row.items():
        if not key.startswith(BENCH_DELTA_PREFIX) or "." in key.split("/", 1)[1] or not _finite(delta):
            continue
        benchmark = key.split("/", 1)[1]
        worse = float(delta) if lower_is_better(benchmark) else -float(delta)
        after = row.get(f"{BENCH_PREFIX}{benchmark}")
        before = float(after) - float(delta) if _finite(after) else math.nan
        regressions[benchmark] = worse / abs(before) if _finite(before) and abs(before) > 1e-12 else worse
    return regressions


def _kl_peak(row: dict[str, Any], kl_metric: str) -> float:
    """The largest value of the KL curve (the final value when only that is known); NaN when not logged."""
    for key in (f"{kl_metric}.max", kl_metric):
        if key in row and row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key])):
            return float(row[key])
    return math.nan


def _exclusion(row: dict[str, Any], rule: SelectionRule, metric: str) -> tuple[str | None, str]:
    """(why this trial cannot win or None, notes)."""
    notes = []
    if rule.stage is not None and row.get("stage") not in (None, rule.stage):
        return f"stage {row.get('stage')}, not {rule.stage}", ""
    if rule.arm is not None and row.get("arm") != rule.arm:
        return f"arm {row.get('arm')}, not {rule.arm}", ""
    if row.get("status") != "FINISHED":
        error = f": {row['error']}" if row.get("error") else ""
        return f"run ended {row.get('status')}{error}", ""
    if not _finite(row.get(metric)):
        return f"no finite final {metric}", ""
    if row.get("non_finite") or not row.get("stable", True):
        return f"unstable training ({row.get('stability_reason')})", ""
    kl_peak = row["kl_peak"]
    if rule.kl_budget is not None:
        if math.isnan(kl_peak):
            notes.append(f"no {rule.kl_metric} logged: KL budget not checked")
        elif not kl_peak <= rule.kl_budget:
            return f"{rule.kl_metric} reached {kl_peak:.4g}, over the KL budget {rule.kl_budget:g}", ""
    for benchmark, regression in sorted(benchmark_regressions(row).items()):
        if regression > rule.benchmark_tolerance:
            return (f"{BENCH_PREFIX}{benchmark} regressed by {regression:.1%} of its starting score "
                    f"(tolerance {rule.benchmark_tolerance:.1%})"), ""
    return None, "; ".join(notes)


def _describe(row: dict[str, Any], metric: str) -> str:
    return (f"trial {row['trial_id']} (beta {row['beta']:g}, kl_weight {row['kl_weight']:g}, "
            f"learning_rate {row['learning_rate']:g}): {metric} {row['score']:.4f}")


def _pick(candidates: list[dict[str, Any]], tie_tolerance: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(winner, best scorer): the smallest beta among the trials within tie_tolerance of the best score."""
    best = max(candidates, key=lambda row: row["score"])
    tied = [row for row in candidates if row["score"] >= best["score"] - tie_tolerance]
    winner = min(tied, key=lambda row: (row["beta"], -row["score"], row.get("start_time") or 0))
    return winner, best


def _why(winner: dict[str, Any], best: dict[str, Any], candidates: list[dict[str, Any]], metric: str,
         rule: SelectionRule) -> str:
    text = f"{_describe(winner, metric)}"
    if winner is best or winner["score"] >= best["score"]:
        text += f", the highest of {len(candidates)} eligible trial{'s' if len(candidates) != 1 else ''}"
    else:
        text += (f", within the tie tolerance {rule.tie_tolerance:g} of the best {best['score']:.4f} "
                 f"(trial {best['trial_id']} at beta {best['beta']:g}), so the smaller beta wins")
    return text


def select_trial(trials: pd.DataFrame, rule: SelectionRule | None = None) -> Selection:
    """Apply the rule (module docstring) to a trial table; never raises for an empty or all-excluded table."""
    rule = rule or SelectionRule()
    metric = resolve_metric(trials, rule.metric)
    rows = trials.to_dict("records")
    for row in rows:
        row["score"] = float(row[metric]) if _finite(row.get(metric)) else math.nan
        row["kl_peak"] = _kl_peak(row, rule.kl_metric)
        excluded, notes = _exclusion(row, rule, metric)
        row["eligible"], row["excluded_because"], row["notes"] = excluded is None, excluded or "", notes
    table = pd.DataFrame(rows, columns=list(trials.columns) + ["score", "kl_peak", "eligible", "excluded_because", "notes"])
    eligible = [row for row in rows if row["eligible"]]
    budget = f"{rule.kl_metric} <= {rule.kl_budget:g}" if rule.kl_budget is not None else "no KL budget"
    conditions = (f"stable, {budget}, benchmark regressions <= {rule.benchmark_tolerance:.0%}"
                  + (f", stage {rule.stage}" if rule.stage else "") + (f", arm {rule.arm}" if rule.arm else ""))
    if not eligible:
        reasons = "; ".join(f"{row['trial_id']}: {row['excluded_because']}" for row in rows) or "the sweep has no trials"
        return Selection(metric, rule, None, None,
                         f"no trial passes the rule ({conditions}): {reasons}. Relax the rule (e.g. --kl-budget) or "
                         "run more trials.", "", table)
    winner, best = _pick(eligible, rule.tie_tolerance)
    reason = _why(winner, best, eligible, metric, rule) + f" ({conditions})"
    beaten = [row for row in rows if not row["eligible"] and _finite(row["score"]) and row["score"] > winner["score"]]
    if beaten:
        reason += "; higher-scoring trials excluded: " + "; ".join(
            f"{row['trial_id']} (beta {row['beta']:g}, {row['score']:.4f}): {row['excluded_because']}"
            for row in sorted(beaten, key=lambda row: -row["score"]))
    others = [row for row in eligible if row is not winner]
    runner_up, runner_up_reason = None, "no other trial passes the rule"
    if others:
        runner_up, runner_best = _pick(others, rule.tie_tolerance)
        runner_up_reason = _why(runner_up, runner_best, others, metric, rule).replace("eligible trial", "remaining trial")
    return Selection(metric, rule, winner, runner_up, reason, runner_up_reason, table)


def rank_losses(table: pd.DataFrame) -> pd.DataFrame:
    """One row per loss of a sweep over `dpo.loss` (a select_trial table): its best eligible trial (by score),
    with its beta; losses without an eligible trial last, with the reason of their best-scoring trial."""
    columns = ["rank", "loss", "beta", "score", "trial_id", "eligible", "excluded_because"]
    if "loss" not in table.columns or table.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for loss, group in table.groupby(table["loss"].astype(str)):
        eligible = group[group["eligible"]]
        pool = eligible if not eligible.empty else group
        scored = pool[pool["score"].map(_finite)]
        best = (scored.sort_values(["score", "beta"], ascending=[False, True]) if not scored.empty else pool).iloc[0]
        rows.append({"loss": loss, "beta": best["beta"], "score": best["score"], "trial_id": best["trial_id"],
                     "eligible": not eligible.empty,
                     "excluded_because": "" if not eligible.empty else best.get("excluded_because", "")})
    ranked = sorted(rows, key=lambda row: (not row["eligible"], -(row["score"] if _finite(row["score"]) else -math.inf)))
    return pd.DataFrame([{"rank": index + 1, **row} for index, row in enumerate(ranked)], columns=columns)
