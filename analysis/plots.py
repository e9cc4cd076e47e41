"""The report's PNG plots, drawn with matplotlib's Agg backend (no display needed).

Each function takes the trial table of `analysis.selection.select_trial(...).table` (and curves or the
decision log where needed), writes one PNG and returns its path:
- `metrics_vs_beta`: final eval accuracy, reward margin, KL and every `bench/*` score against beta;
  stable trials filled, excluded trials hollow, the chosen one starred;
- `training_curves`: train/loss and the reward margin (eval, else train) per trial against the step;
- `reward_kl_frontier`: the final score against the exact KL peak, with the upper-left frontier;
- `search_path`: the incremental searcher's rounds (beta per round, coloured by its action), or the
  trials in start order when the sweep had no decision log (grid, random, optuna).
Used by analysis/report.py; tested by `python -m pytest tests/test_analysis.py -q`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from orchestrator.tracking.schema import BENCH_PREFIX, LOSS_METRIC  # noqa: E402

ACTION_COLOURS = {"climb": "tab:green", "explore_down": "tab:cyan", "back_off_halve_step": "tab:orange",
                  "back_off_raise_kl_weight": "tab:orange",
                  "stop": "tab:red"}
FIGURE_DPI = 110


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def _chosen_id(chosen: dict[str, Any] | None) -> str | None:
    return None if chosen is None else str(chosen["trial_id"])


def _scatter_by_verdict(axis: plt.Axes, table: pd.DataFrame, x: str, y: str, chosen: str | None) -> None:
    """Eligible trials filled, excluded ones hollow, the chosen one a big star; x/y columns may hold NaN."""
    data = table[[x, y, "eligible", "trial_id"]].dropna(subset=[x, y])
    eligible, excluded = data[data["eligible"]], data[~data["eligible"]]
    axis.scatter(eligible[x], eligible[y], color="tab:blue", label="eligible", zorder=3)
    axis.scatter(excluded[x], excluded[y], facecolors="none", edgecolors="tab:red", label="excluded", zorder=3)
    picked = data[data["trial_id"] == chosen]
    if not picked.empty:
        axis.scatter(picked[x], picked[y], marker="*", s=260, color="gold", edgecolors="black", label="chosen", zorder=4)


def metrics_vs_beta(table: pd.DataFrame, chosen: dict[str, Any] | None, metric: str, kl_metric: str,
                    path: Path) -> Path:
    """One panel per quantity against beta: the score, eval/reward_margin, the KL peak and each bench/* score."""
    panels = [(metric, metric), ("eval/reward_margin", "eval/reward_margin"), ("kl_peak", f"{kl_metric} (peak)")]
    panels += [(column, column) for column in sorted(table.columns)
               if column.startswith(BENCH_PREFIX) and "." not in column.split("/", 1)[1]]
    panels = [(column, label) for column, label in panels
              if column in table.columns and table[column].map(lambda v: isinstance(v, float) and math.isfinite(v)).any()]
    if not panels:
        panels = [("score", metric)]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, (column, label) in zip(axes.flat, panels):
        _scatter_by_verdict(axis, table, "beta", column, _chosen_id(chosen))
        axis.set_xlabel("beta")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("final metrics against beta", fontsize=11)
    return _save(figure, path)


def training_curves(curves: pd.DataFrame, table: pd.DataFrame, chosen: dict[str, Any] | None, path: Path) -> Path:
    """train/loss and the reward margin per trial (long frame of SweepRuns.curves) against the step."""
    margin_key = "eval/reward_margin" if (curves["key"] == "eval/reward_margin").any() else "train/reward_margin"
    figure, (loss_axis, margin_axis) = plt.subplots(1, 2, figsize=(11, 4))
    verdict = dict(zip(table["trial_id"], table["eligible"]))
    for trial_id, trial_curves in curves.groupby("trial_id", sort=False):
        first = trial_curves.iloc[0]
        label = f"{trial_id} beta={first['beta']:g}" + ("" if verdict.get(trial_id, True) else " (excluded)")
        style = {"linewidth": 2.6 if trial_id == _chosen_id(chosen) else 1.2,
                 "linestyle": "-" if verdict.get(trial_id, True) else "--"}
        for axis, key in ((loss_axis, LOSS_METRIC), (margin_axis, margin_key)):
            curve = trial_curves[trial_curves["key"] == key].sort_values("step")
            if not curve.empty:
                axis.plot(curve["step"], curve["value"], label=label, **style)
    for axis, title in ((loss_axis, LOSS_METRIC), (margin_axis, margin_key)):
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    loss_axis.legend(fontsize=7)
    figure.suptitle("loss and reward margin per trial (thick: chosen, dashed: excluded)", fontsize=11)
    return _save(figure, path)


def reward_kl_frontier(table: pd.DataFrame, chosen: dict[str, Any] | None, kl_metric: str,
                       kl_budget: float | None, path: Path, score: str = "score") -> Path:
    """The score (held-out preference accuracy or win rate: the reward the sweep maximises) against the KL
    peak (the exact per-token KL(pi || pi_ref) of eval/kl, nats per token), with the upper-left frontier:
    the best score an eligible trial reaches at or below each KL. Labels: beta (and the loss when several).
    The implicit reward margin is not used: it is beta times a log-ratio, on another scale for each beta."""
    figure, axis = plt.subplots(figsize=(6.5, 4.6))
    several_losses = "loss" in table.columns and table["loss"].astype(str).nunique() > 1
    if score in table.columns and "kl_peak" in table.columns:
        _scatter_by_verdict(axis, table, "kl_peak", score, _chosen_id(chosen))
        columns = ["kl_peak", score, "beta", "eligible"] + (["loss"] if several_losses else [])
        points = table[columns].dropna(subset=["kl_peak", score]).sort_values(["kl_peak", score], ascending=[True, False])
        frontier, best = [], -math.inf
        for row in points.itertuples(index=False):
            if row[3] and row[1] > best:  # the frontier joins eligible trials only
                frontier.append((row[0], row[1]))
                best = row[1]
            label = f"{row[2]:g}" + (f" {row[4]}" if several_losses else "")
            axis.annotate(label, (row[0], row[1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if frontier:  # a step line: the best score an eligible trial reaches at or below each KL
            frontier.append((float(points["kl_peak"].max()), frontier[-1][1]))
            axis.step(*zip(*frontier), where="post", color="grey", linewidth=1, label="frontier (eligible)", zorder=2)
        positive = points["kl_peak"][points["kl_peak"] > 0]
        if len(positive) > 1 and positive.max() / positive.min() > 100:
            axis.set_xscale("log")  # KLs of betas an order of magnitude apart
    if kl_budget is not None:
        axis.axvline(kl_budget, color="tab:red", linestyle=":", label=f"KL budget {kl_budget:g}")
    axis.set_xlabel(f"{kl_metric} (peak, nats per answer token)")
    axis.set_ylabel(score if score != "score" else "score (final)")
    axis.set_title("score-KL frontier (labels: beta" + (", loss" if several_losses else "") + ")", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def search_path(decision_log: list[dict[str, Any]], table: pd.DataFrame, metric: str, path: Path) -> Path:
    """Beta per round of the incremental searcher (one line per study arm), coloured by its action."""
    figure, axis = plt.subplots(figsize=(7, 4.2))
    if decision_log:
        arms = sorted({str(entry.get("arm", "")) for entry in decision_log})
        for arm in arms:
            entries = [entry for entry in decision_log if str(entry.get("arm", "")) == arm]
            rounds = [entry.get("round", index + 1) for index, entry in enumerate(entries)]
            betas = [entry.get("beta") for entry in entries]
            axis.plot(rounds, betas, linewidth=1, zorder=1, label=arm or None,
                      color="grey" if len(arms) == 1 else None)
            for round_number, beta, entry in zip(rounds, betas, entries):
                action = str(entry.get("action", ""))
                axis.scatter([round_number], [beta], color=ACTION_COLOURS.get(action, "tab:purple"), s=60, zorder=3)
                value = entry.get("best_metric")
                text = action.replace("back_off_", "back off: ")
                text += f" {value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""
                axis.annotate(text, (round_number, beta), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if len(arms) > 1:
            axis.legend(fontsize=8)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.margins(x=0.2)  # room for the labels of the last round
        axis.set_title(f"incremental beta search: beta per round (label: action, {metric})", fontsize=10)
    else:
        ordered = table.sort_values("start_time")
        axis.plot(range(1, len(ordered) + 1), ordered["beta"], marker="o", color="tab:blue")
        axis.set_xlabel("trial (in start order)")
        axis.set_title("trials in start order (this sweep has no searcher decision log)", fontsize=10)
    axis.set_ylabel("beta")
    axis.grid(alpha=0.3)
    return _save(figure, path)
