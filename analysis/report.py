"""The analysis report of one sweep: Markdown + HTML + PNG plots + tables, logged on the sweep's parent run.

`write_report(sweep, selection, directory)` writes into `directory`:
    report.md            the choice, its reason and the runner-up; the rule; the losses ranked (a sweep over
                         dpo.loss); the diagnoses (analysis/diagnoses.py) with the trials they concern; every
                         trial with its verdict; the searcher's decision log; the plots (relative links)
    report.html          the same, self-contained (plots embedded as base64 PNG)
    metrics_vs_beta.png  training_curves.png  reward_kl_frontier.png  search_path.png
    trials.csv           the full trial table with the rule's columns (score, kl_peak, eligible, ...)
    selection.json       the chosen trial, the runner-up, the reasons and the rule's settings
`log_report` uploads the folder as the parent run's `analysis/` artifacts and tags the parent run with
`analysis.chosen_trial`, `analysis.chosen_beta`, `analysis.metric`. `analyze` does everything `dpo analyze`
does (read the runs, apply the rule, write and log the report), e.g. in a notebook:

    from analysis.report import analyze
    result = analyze("http://127.0.0.1:5000", "quickstart", report_dir="runs/quickstart/analysis")
    print("\n".join(result.lines()))

Run through `dpo analyze CONFIG`; tested by `python -m pytest tests/test_analysis.py -q`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import plots
from analysis.runs import SweepRuns, load_sweep, shown_uri
from analysis.diagnoses import CURVE_KEYS, Diagnosis, curves_by_trial, diagnose
from analysis.selection import Selection, SelectionRule, rank_losses, select_trial
from orchestrator.tracking.schema import (ANALYSIS_ARTIFACT_FOLDER, ANALYSIS_CHOSEN_BETA_TAG, ANALYSIS_CHOSEN_TRIAL_TAG,
                                          ANALYSIS_METRIC_TAG, ANALYSIS_REASON_TAG, CHOSEN_BETA_METRIC,
                                          CHOSEN_SCORE_METRIC, DATA_TAG_PREFIX, GIT_COMMIT_TAG, LOSS_METRIC,
                                          REFERENCE_CACHE_KEY_TAG)

TABLE_COLUMNS = ["trial_id", "arm", "loss", "beta", "kl_weight", "learning_rate", "status", "steps", "score",
                 "eval/reward_margin", "kl_peak", "stable", "oscillation_score", "eligible", "excluded_because"]
PLOT_TITLES = {"metrics_vs_beta": "Final metrics against beta", "training_curves": "Loss and margin curves",
               "reward_kl_frontier": "Reward-KL frontier", "search_path": "The searcher's path"}


@dataclass
class Report:
    """Where the report went."""

    directory: Path
    markdown: Path
    html: Path
    plots: dict[str, Path]  # plot name -> PNG path
    selection_json: Path
    trials_csv: Path


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    columns = [column for column in TABLE_COLUMNS if column in table.columns
               and (column not in ("arm", "loss") or table[column].notna().any())]  # the arm only for a study
    return columns, [[_cell(value) for value in row] for row in table[columns].itertuples(index=False)]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda text: text.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _decision_rows(decision_log: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = (["arm"] if any("arm" in entry for entry in decision_log) else []) + [
        "round", "beta", "kl_weights", "best_metric", "action", "reason"]
    return header, [[_cell(entry.get(key)) if key != "kl_weights" else _cell(json.dumps(entry.get(key)))
                     for key in header] for entry in decision_log]


def _facts(sweep: SweepRuns, selection: Selection) -> list[tuple[str, str]]:
    tags = sweep.parent_tags
    facts = [("tracking URI", shown_uri(sweep.uri)), ("experiment id", sweep.experiment_id),
             ("parent run", sweep.parent_run_id or "(none found)"), ("trials", str(len(sweep.trials))),
             ("score", selection.metric), ("git commit", tags.get(GIT_COMMIT_TAG, ""))]
    facts += [(key, value) for key, value in sorted(tags.items())
              if key.startswith(DATA_TAG_PREFIX) or key == REFERENCE_CACHE_KEY_TAG]
    return [(name, value) for name, value in facts if value]


def _choice_lines(selection: Selection) -> list[str]:
    if selection.chosen is None:
        return ["**No trial passes the rule.**", "", selection.reason]
    chosen = selection.chosen
    lines = [f"**Chosen: beta {chosen['beta']:g}** (kl_weight {chosen['kl_weight']:g}, learning_rate "
             f"{chosen['learning_rate']:g}, trial `{chosen['trial_id']}`, MLflow run `{chosen['run_id']}`)", "",
             f"Why: {selection.reason}", ""]
    runner = selection.runner_up
    lines.append(f"Runner-up: beta {runner['beta']:g} - {selection.runner_up_reason}" if runner
                 else f"Runner-up: none ({selection.runner_up_reason})")
    return lines


def _rule_lines(selection: Selection) -> list[str]:
    return [f"- `{key}`: {value}" for key, value in selection.rule.as_dict().items()] + [
        f"- score used: `{selection.metric}` (final value); ties within `tie_tolerance` go to the smaller beta"]


def loss_ranking_lines(table: pd.DataFrame) -> tuple[list[str], list[list[str]]] | None:
    """The header and rows of 'Losses ranked' when the sweep compared several losses (sweep.loss), else None."""
    if "loss" not in table.columns or table["loss"].dropna().astype(str).nunique() < 2:
        return None
    ranked = rank_losses(table)
    header = ["rank", "loss", "beta", "score", "trial_id", "eligible", "excluded_because"]
    return header, [[_cell(value) for value in row] for row in ranked[header].itertuples(index=False)]


def diagnosis_lines(diagnoses: list[Diagnosis]) -> list[str]:
    """Markdown lines: each failure mode found, what to try, and the trials concerned with their evidence."""
    found = [diagnosis for diagnosis in diagnoses if diagnosis.findings]
    if not found:
        checked = ", ".join(diagnosis.title.split(":")[0].lower() for diagnosis in diagnoses)
        return [f"None found (checked: {checked})."]
    lines = []
    for diagnosis in found:
        lines += [f"### {diagnosis.title}", "", f"Try: {diagnosis.suggestion}.", ""]
        lines += [f"- trial `{finding.trial_id}`: {finding.evidence}" for finding in diagnosis.findings] + [""]
    return lines


def _write_plots(sweep: SweepRuns, selection: Selection, directory: Path) -> dict[str, Path]:
    table, chosen, rule = selection.table, selection.chosen, selection.rule
    margin = "eval/reward_margin"
    curves = sweep.curves([LOSS_METRIC, margin, "train/reward_margin"])
    return {
        "metrics_vs_beta": plots.metrics_vs_beta(table, chosen, selection.metric, rule.kl_metric,
                                                 directory / "metrics_vs_beta.png"),
        "training_curves": plots.training_curves(curves, table, chosen, directory / "training_curves.png"),
        "reward_kl_frontier": plots.reward_kl_frontier(table, chosen, rule.kl_metric, rule.kl_budget,
                                                       directory / "reward_kl_frontier.png"),
        "search_path": plots.search_path(sweep.decision_log, table, selection.metric, directory / "search_path.png"),
    }


def write_report(sweep: SweepRuns, selection: Selection, directory: str | Path) -> Report:
    """Write the report files (module docstring) into `directory`, created if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = _write_plots(sweep, selection, directory)
    selection.table.to_csv(directory / "trials.csv", index=False)
    (directory / "selection.json").write_text(json.dumps(
        {"sweep": sweep.name, "tracking_uri": shown_uri(sweep.uri), "parent_run_id": sweep.parent_run_id, **selection.summary()},
        indent=1, default=str))
    header, rows = _rows(selection.table)
    decision_header, decision_rows = _decision_rows(sweep.decision_log)
    ranking = loss_ranking_lines(selection.table)
    diagnoses = diagnosis_lines(diagnose(curves_by_trial(sweep.curves(CURVE_KEYS))))
    written = time.strftime("%Y-%m-%d %H:%M:%S")

    markdown = [f"# Analysis of sweep `{sweep.name}`", "", f"Written {written}.", ""]
    markdown += [f"- {name}: `{value}`" for name, value in _facts(sweep, selection)] + [""]
    markdown += ["## The choice", ""] + _choice_lines(selection) + ["", "## The rule", ""] + _rule_lines(selection)
    if ranking:
        markdown += ["", "## Losses ranked", "", "Each loss's best eligible trial, by the score, with its beta.", "",
                     markdown_table(*ranking)]
    markdown += ["", "## Diagnoses", ""] + diagnoses
    markdown += ["", "## Trials", "", markdown_table(header, rows), ""]
    if sweep.decision_log:
        markdown += ["## The searcher's decision log", "", markdown_table(decision_header, decision_rows), ""]
    markdown += ["## Plots", ""]
    for name, path in figures.items():
        markdown += [f"### {PLOT_TITLES[name]}", "", f"![{PLOT_TITLES[name]}]({path.name})", ""]
    (directory / "report.md").write_text("\n".join(markdown))

    paragraph = lambda text: f"<p>{html.escape(text)}</p>"
    parts = [f"<h1>Analysis of sweep {html.escape(sweep.name)}</h1>", paragraph(f"Written {written}."),
             "<ul>" + "".join(f"<li>{html.escape(n)}: <code>{html.escape(v)}</code></li>" for n, v in _facts(sweep, selection)) + "</ul>",
             "<h2>The choice</h2>"] + [paragraph(line.replace("**", "").replace("`", "")) for line in _choice_lines(selection) if line]
    parts += ["<h2>The rule</h2>", "<ul>" + "".join(f"<li>{html.escape(line[2:].replace('`', ''))}</li>" for line in _rule_lines(selection)) + "</ul>"]
    if ranking:
        parts += ["<h2>Losses ranked</h2>", html_table(*ranking)]
    parts += ["<h2>Diagnoses</h2>"] + [paragraph(line.lstrip("#- ").replace("`", "")) for line in diagnoses if line]
    parts += ["<h2>Trials</h2>", html_table(header, rows)]
    if sweep.decision_log:
        parts += ["<h2>The searcher's decision log</h2>", html_table(decision_header, decision_rows)]
    parts.append("<h2>Plots</h2>")
    for name, path in figures.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts += [f"<h3>{PLOT_TITLES[name]}</h3>", f'<img alt="{PLOT_TITLES[name]}" src="data:image/png;base64,{encoded}">']
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}img{max-width:100%}")
    (directory / "report.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Analysis of {html.escape(sweep.name)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return Report(directory=directory, markdown=directory / "report.md", html=directory / "report.html", plots=figures,
                  selection_json=directory / "selection.json", trials_csv=directory / "trials.csv")


def log_report(sweep: SweepRuns, selection: Selection, report: Report, *, client: Any = None) -> str | None:
    """Upload the report as the parent run's `analysis/` artifacts and tag the choice; returns the run id."""
    if sweep.parent_run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri=sweep.uri)
    client.log_artifacts(sweep.parent_run_id, str(report.directory), ANALYSIS_ARTIFACT_FOLDER)
    chosen = selection.chosen
    tags = {ANALYSIS_METRIC_TAG: selection.metric, ANALYSIS_REASON_TAG: selection.reason[:4000],
            ANALYSIS_CHOSEN_TRIAL_TAG: chosen["trial_id"] if chosen else "none",
            ANALYSIS_CHOSEN_BETA_TAG: f"{chosen['beta']:g}" if chosen else "none"}
    for key, value in tags.items():
        client.set_tag(sweep.parent_run_id, key, value)
    if chosen:  # as metrics too: the runs table and its charts show the choice beside the sweep's best
        score = chosen.get(selection.metric)
        client.log_metric(sweep.parent_run_id, CHOSEN_BETA_METRIC, float(chosen["beta"]))
        if isinstance(score, (int, float)) and math.isfinite(score):
            client.log_metric(sweep.parent_run_id, CHOSEN_SCORE_METRIC, float(score))
    return sweep.parent_run_id


@dataclass
class Analysis:
    """A finished analysis: the runs read, the rule's verdict and the report written."""

    sweep: SweepRuns
    selection: Selection
    report: Report
    logged_to_run: str | None  # the parent run holding the report artifacts, if logged

    def run_url(self) -> str:
        """A link to the sweep's parent run in the MLflow UI (the tracking URI when it is not HTTP)."""
        if not self.sweep.uri.startswith(("http://", "https://")) or self.sweep.parent_run_id is None:
            return self.sweep.uri
        return f"{self.sweep.uri.rstrip('/')}/#/experiments/{self.sweep.experiment_id}/runs/{self.sweep.parent_run_id}"

    def lines(self) -> list[str]:
        """What `dpo analyze` prints: the choice, the reason, the runner-up, the report and where it was logged."""
        selection = self.selection
        counts = f"{int(selection.table['eligible'].sum())} of {len(selection.table)} trials pass the rule"
        out = [f"sweep {self.sweep.name}: {counts} (score {selection.metric})"]
        chosen = selection.chosen
        if chosen is None:
            out.append(f"no beta chosen: {selection.reason}")
        else:
            out.append(f"chosen beta {chosen['beta']:g} (kl_weight {chosen['kl_weight']:g}, learning_rate "
                       f"{chosen['learning_rate']:g}, trial {chosen['trial_id']})")
            out.append(f"  reason: {selection.reason}")
            runner = selection.runner_up
            out.append(f"  runner-up: {selection.runner_up_reason}" if runner else "  runner-up: none")
        for row in selection.table.itertuples(index=False):
            if not row.eligible:
                out.append(f"  excluded {row.trial_id} (beta {row.beta:g}): {row.excluded_because}")
        out.append(f"report: {self.report.html} (and report.md, plots, trials.csv in {self.report.directory})")
        if self.logged_to_run:
            out.append(f"logged on the parent run: {self.run_url()} (artifacts: analysis/)")
        return out


def analyze(uri: str, name: str, *, report_dir: str | Path, experiment: str | None = None,
            rule: SelectionRule | None = None, log_to_mlflow: bool = True) -> Analysis:
    """Load sweep `name` from `uri`, select a trial, write the report into report_dir and log it (optional)."""
    sweep = load_sweep(uri, name, experiment)
    selection = select_trial(sweep.trials, rule or SelectionRule())
    report = write_report(sweep, selection, report_dir)
    logged = log_report(sweep, selection, report) if log_to_mlflow else None
    return Analysis(sweep=sweep, selection=selection, report=report, logged_to_run=logged)
