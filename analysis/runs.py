"""A sweep's (or study's) MLflow runs as pandas: one row per trial, step curves on demand.

The Python API behind `dpo analyze`, usable in a notebook:

    from analysis.runs import load_sweep
    sweep = load_sweep("http://127.0.0.1:5000", "quickstart")
    sweep.trials                                   # one row per trial: params, final/best metrics, stability
    sweep.curves(["train/loss", "eval/kl"])        # long frame: trial_id, beta, key, step, value

Runs are found as the sweep writes them, by the names of the records schema that writer and reader
share (orchestrator/tracking/schema.py): the experiment (default: the sweep name), the parent run tagged
`sweep=<name>, dpo.role=parent`, and one child run per trial tagged `trial_id`, `sweep` and
`dpo.role=trial`. For a study (`dpo study`, tag `study=<name>`), the trials of
every arm's sweep hung under the study's parent run, each with its `arm`.
A restarted trial may log a step twice; each curve keeps the last value logged per step.
Columns of `trials`: `run_id trial_id sweep status stage arm beta kl_weight learning_rate loss steps checkpoint_dir
decision round error start_time`, then for every metric `<key>` (its final value) and `<key>.best`
(max, or min for losses, KL, perplexity and gradient norms), `<key>.max` for KL metrics, and the
stability verdict of `train/loss` (analysis/stability.py): `stable oscillating diverging non_finite
oscillation_score stability_reason`.
Tested by `python -m pytest tests/test_analysis.py -q`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.stability import assess_loss_curve
from orchestrator.errors import NotFoundError
from orchestrator.tracking.schema import (ARM_TAG, CHECKPOINT_DIR_TAG, DATA_TAG_PREFIX, DECISION_LOG_ARTIFACT,
                                          DECISION_TAG, ERROR_TAG, LOSS_METRIC, LOSS_PARAM, NAME_PATTERN, PARENT_ROLE,
                                          PARENT_RUN_TAG, REFERENCE_CACHE_KEY_TAG, ROLE_TAG, ROUND_TAG,
                                          SEARCHED_PARAMS, STAGE_TAG, STUDY_ROLE, STUDY_TAG, SWEEP_TAG, TRIAL_ID_TAG,
                                          TRIAL_ROLE, search_all_runs, tag_filter)

# Curves whose NaN or inf means the trial's training broke (besides the loss curve judged for stability).
NON_FINITE_KEYS = (LOSS_METRIC, "train/preference_loss", "eval/loss", "eval/preference_loss")
NON_FINITE_ERROR = re.compile(r"non-finite|\bnan\b|\binf\b", re.IGNORECASE)  # the error tag of a trial whose loss broke
LOWER_IS_BETTER_WORDS = ("loss", "kl", "perplexity", "grad_norm", "seconds", "dropped")


class SweepNotFoundError(NotFoundError):
    """No experiment, parent run or trial runs for the sweep name at the tracking URI (a user error, exit 2)."""


def shown_uri(uri: str) -> str:
    """The tracking URI as a message shows it: credentials (user:password@, ?token=...) left out."""
    return re.sub(r"[?#].*$", "", re.sub(r"(://)[^/@\s]*@", r"\1***@", str(uri)))


def lower_is_better(key: str) -> bool:
    """`train/loss`, `eval/kl`, `bench/perplexity`: smaller is better; accuracies, margins, scores: larger."""
    name = key.rsplit("/", 1)[-1].lower()
    return any(word in name for word in LOWER_IS_BETTER_WORDS)


def curve_from_points(points: Iterable[Any]) -> pd.Series:
    """MLflow metric points -> values indexed by step, the last logged value kept for a repeated step.

    "Last" is the newest timestamp (a restarted trial re-logs the steps after its checkpoint); among equal
    timestamps, the later point in the server's order.
    """
    rows = [(int(p.step), int(p.timestamp), order, float(p.value)) for order, p in enumerate(points)]
    if not rows:
        return pd.Series(dtype=float, name="value")
    frame = pd.DataFrame(rows, columns=["step", "timestamp", "order", "value"])
    frame = frame.sort_values(["step", "timestamp", "order"]).drop_duplicates("step", keep="last")
    return pd.Series(frame["value"].to_numpy(), index=pd.Index(frame["step"].to_numpy(), name="step"), name="value")


@dataclass
class SweepRuns:
    """What MLflow holds about one sweep: its parent run, a trial table and every trial's curves."""

    uri: str  # tracking URI the runs were read from
    name: str  # sweep (or study) name
    experiment_id: str
    parent_run_id: str | None  # None when only trial runs were found
    parent_tags: dict[str, str]  # data fingerprints, reference_cache_key, git commit, ...
    trials: pd.DataFrame  # one row per trial run (columns in the module docstring)
    histories: dict[str, dict[str, pd.Series]] = field(repr=False)  # run_id -> metric key -> values by step
    decision_log: list[dict[str, Any]] = field(default_factory=list)  # the incremental searcher's rounds

    def history(self, trial_id: str, key: str) -> pd.Series:
        """One trial's curve of `key` (values indexed by step; empty if it never logged it)."""
        run_id = self.run_id_of(trial_id)
        return self.histories.get(run_id, {}).get(key, pd.Series(dtype=float, name="value"))

    def run_id_of(self, trial_id: str) -> str:
        match = self.trials[self.trials["trial_id"] == trial_id]
        if match.empty:
            known = ", ".join(sorted(map(str, self.trials["trial_id"])))
            raise SweepNotFoundError(f"no trial {str(trial_id)[:80]!r} in sweep {self.name!r} at {shown_uri(self.uri)}; "
                                     f"its trials: {known[:400]}")
        return str(match.iloc[0]["run_id"])

    def curves(self, keys: Iterable[str] = (LOSS_METRIC,)) -> pd.DataFrame:
        """Long frame of the given metric curves: trial_id, beta, kl_weight, learning_rate, key, step, value."""
        keys = list(keys)
        parts = []
        for row in self.trials.itertuples(index=False):
            for key in keys:
                curve = self.histories.get(row.run_id, {}).get(key)
                if curve is None or curve.empty:
                    continue
                parts.append(pd.DataFrame({"trial_id": row.trial_id, "beta": row.beta, "kl_weight": row.kl_weight,
                                           "learning_rate": row.learning_rate, "key": key,
                                           "step": curve.index.to_numpy(), "value": curve.to_numpy()}))
        columns = ["trial_id", "beta", "kl_weight", "learning_rate", "key", "step", "value"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def _float_param(params: dict[str, str], name: str) -> float:
    for key in (name, SEARCHED_PARAMS.get(name, name)):
        try:
            return float(params[key])
        except (KeyError, TypeError, ValueError):
            continue
    return math.nan


def trial_row(run: Any, curves: dict[str, pd.Series]) -> dict[str, Any]:
    """The table row of one trial run from its MLflow run object and deduplicated curves."""
    tags, params = run.data.tags, run.data.params
    loss = curves.get(LOSS_METRIC, pd.Series(dtype=float))
    verdict = assess_loss_curve(loss.tolist())
    broken_curves = [key for key in NON_FINITE_KEYS
                     if key in curves and not all(math.isfinite(v) for v in curves[key].tolist())]
    error = tags.get(ERROR_TAG)
    error_non_finite = bool(error) and NON_FINITE_ERROR.search(error) is not None
    row: dict[str, Any] = {
        "run_id": run.info.run_id, "trial_id": tags.get(TRIAL_ID_TAG, run.info.run_name), "sweep": tags.get(SWEEP_TAG),
        "status": run.info.status,
        "stage": tags.get(STAGE_TAG), "arm": tags.get(ARM_TAG),
        **{name: _float_param(params, name) for name in SEARCHED_PARAMS},
        "loss": params.get(LOSS_PARAM),
        "steps": int(loss.index.max()) if not loss.empty else 0,
        "checkpoint_dir": tags.get(CHECKPOINT_DIR_TAG), "decision": tags.get(DECISION_TAG), "round": tags.get(ROUND_TAG),
        "error": error, "start_time": run.info.start_time,
        "stable": verdict.stable and not broken_curves and not error_non_finite,
        "oscillating": verdict.oscillating, "diverging": verdict.diverging,
        "non_finite": verdict.non_finite or bool(broken_curves) or error_non_finite,
        "oscillation_score": verdict.oscillation_score,
        "stability_reason": verdict.reason if not (broken_curves or error_non_finite) else
        "; ".join(filter(None, [f"non-finite values in {', '.join(broken_curves)}" if broken_curves else "",
                                f"the trial failed: {error}" if error_non_finite else "", verdict.reason])),
    }
    for key, curve in sorted(curves.items()):
        values = curve[curve.map(math.isfinite)] if not curve.empty else curve
        row[key] = float(curve.iloc[-1]) if not curve.empty else math.nan
        if values.empty:
            row[f"{key}.best"] = math.nan
        else:
            row[f"{key}.best"] = float(values.min() if lower_is_better(key) else values.max())
        if key.endswith("/kl"):
            row[f"{key}.max"] = float(curve.max()) if not curve.empty else math.nan  # NaN propagates: never "within budget"
    return row


def _run_curves(client: Any, run: Any) -> dict[str, pd.Series]:
    return {key: curve_from_points(client.get_metric_history(run.info.run_id, key)) for key in sorted(run.data.metrics)}


def _decision_log(client: Any, parent_run_id: str | None) -> list[dict[str, Any]]:
    """The parent run's decision_log.json artifact (the incremental searcher's rounds), or []."""
    if parent_run_id is None:
        return []
    names = {item.path for item in client.list_artifacts(parent_run_id)}
    if DECISION_LOG_ARTIFACT not in names:
        return []
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar
    with tempfile.TemporaryDirectory(prefix="dpo-decision-log-") as folder:
        path = client.download_artifacts(parent_run_id, DECISION_LOG_ARTIFACT, folder)
        try:
            log = json.loads(Path(path).read_text())
        except json.JSONDecodeError:
            return []
    return log if isinstance(log, list) else []


def _find_runs(client: Any, experiment_id: str, name: str) -> tuple[Any, list[Any], list[tuple[Any, str | None]]]:
    """(the run the report belongs to, the trial runs, [(sweep parent run, arm)]) of sweep or study `name`.

    A sweep: its parent (sweep=<name>, dpo.role=parent) and trials (sweep=<name>, dpo.role=trial). A study
    (orchestrator/workflows/study_records.py): its parent (study=<name>, dpo.role=study), the arm sweeps'
    parent runs hung under it, and their trials, each carrying its `dpo.arm`.
    """
    def search(**tags: str) -> list[Any]:
        return search_all_runs(client, [experiment_id], tag_filter(tags))

    parents = search(**{SWEEP_TAG: name, ROLE_TAG: PARENT_ROLE})
    trials = search(**{SWEEP_TAG: name, ROLE_TAG: TRIAL_ROLE})
    if parents or trials:
        return (parents[0] if parents else None), trials, [(parent, None) for parent in parents[:1]]
    studies = search(**{STUDY_TAG: name, ROLE_TAG: STUDY_ROLE})
    if not studies:
        return None, [], []
    arm_sweeps = search(**{PARENT_RUN_TAG: studies[0].info.run_id, ROLE_TAG: PARENT_ROLE})
    for sweep_parent in arm_sweeps:
        trials += search(**{SWEEP_TAG: sweep_parent.data.tags.get(SWEEP_TAG, ""), ROLE_TAG: TRIAL_ROLE})
    return studies[0], trials, [(run, run.data.tags.get(ARM_TAG)) for run in arm_sweeps]


def load_sweep(uri: str, name: str, experiment: str | None = None, *, client: Any = None) -> SweepRuns:
    """Read sweep (or study) `name` from the MLflow experiment `experiment` (default: `name`) at `uri`.

    Raises SweepNotFoundError naming the sweep and the URI when the experiment or its runs are missing.
    """
    from mlflow.tracking import MlflowClient

    if not re.fullmatch(NAME_PATTERN, name):
        raise SweepNotFoundError(f"sweep name {name[:80]!r}: sweep and study names are letters, digits, '.', '_' and '-'")
    client = client or MlflowClient(tracking_uri=uri)
    experiment_name = experiment or name
    found = client.get_experiment_by_name(experiment_name)
    if found is None:
        raise SweepNotFoundError(
            f"no runs found for sweep {name!r} at {shown_uri(uri)}: there is no MLflow experiment {experiment_name[:80]!r}. Did the "
            "sweep run with tracking on, against this tracking URI (tracking.uri, MLFLOW_TRACKING_URI or the embedded "
            "server of this storage_path)?")
    experiment_id = found.experiment_id
    parent, trials, sweep_parents = _find_runs(client, experiment_id, name)
    if not trials:
        raise SweepNotFoundError(
            f"no runs found for sweep {name!r} at {shown_uri(uri)} (experiment {experiment_name[:80]!r}): "
            + ("its parent run has no trial runs yet" if parent else f"no run is tagged sweep or study = {name!r}"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        curves_per_run = list(pool.map(lambda run: _run_curves(client, run), trials))
    table = pd.DataFrame([trial_row(run, curves) for run, curves in zip(trials, curves_per_run)])
    table = table.sort_values(["start_time", "trial_id"], kind="stable").reset_index(drop=True)
    parent_tags = dict(parent.data.tags) if parent else {}
    decision_log: list[dict[str, Any]] = []
    for sweep_parent, arm in sweep_parents:  # a study's arms: their data fingerprints and searcher logs
        for key, value in sweep_parent.data.tags.items():
            if key.startswith(DATA_TAG_PREFIX) or key == REFERENCE_CACHE_KEY_TAG:
                parent_tags.setdefault(key, value)
        decision_log += [{**entry, "arm": arm} if arm else entry
                         for entry in _decision_log(client, sweep_parent.info.run_id)]
    return SweepRuns(
        uri=uri, name=name, experiment_id=experiment_id, parent_run_id=parent.info.run_id if parent else None,
        parent_tags=parent_tags, trials=table,
        histories={run.info.run_id: curves for run, curves in zip(trials, curves_per_run)},
        decision_log=decision_log,
    )
