"""What a study leaves behind: its MLflow runs and its result table.

MLflow (names from orchestrator/tracking/schema.py): one parent run, a child run per training job and per
model evaluation, found again by their tags, so rerunning `dpo study` continues the same runs instead of
adding duplicates. Every run has the tag `study` (the config's name); the parent has `dpo.role=study`;
children have `mlflow.parentRunId`, `dpo.role` (`train` or `evaluation`), `dpo.stage` (base | sft | dpo),
`dpo.arm` (sft_then_dpo | dpo_only, or `shared` for the base model both arms start from) and
`study.fingerprint` (the settings they ran with). An evaluation run holds `bench/<name>`, and for
trained models `bench_delta/<name>` (against the model it started from) and `bench_delta_vs_base/<name>`.
An arm's sweep keeps its own parent and trial runs (orchestrator/workflows/sweep.py); `adopt_sweep_runs`
hangs them under the study and tags them with the arm. Secrets are redacted as in every other record
(orchestrator/tracking/records.py).

The table: rows base, SFT, DPO-only, SFT+DPO; one column per benchmark. The first Markdown table holds
each model's scores with the change against the model it started from in parentheses (SFT and DPO-only
start from the base model, SFT+DPO from the SFT model); the second holds the changes against the base
model, plus SFT+DPO minus DPO-only: the comparison the study exists for. Printed by `dpo study` and
logged on the parent run as `study_table.md`.
Tested by `python -m pytest tests/test_study.py -q`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Collection, Mapping, Sequence

from orchestrator.tracking import records
from orchestrator.tracking.schema import (ARM_TAG, BENCH_DELTA_PREFIX, BENCH_PREFIX, CLOSED_BY_TAG, CONFIG_ARTIFACT,
                                          PARENT_ROLE, PARENT_RUN_TAG, ROLE_TAG, STAGE_TAG, STUDY_FINGERPRINT_TAG,
                                          STUDY_ROLE, STUDY_TAG, SWEEP_TAG, TRACKING_URI_TAG)

SHARED_ARM = "shared"  # dpo.arm of the base model, the start of both arms
DPO_STAGE = "dpo"  # dpo.stage of an arm's DPO (fixed job or sweep)
BENCH_DELTA_VS_BASE_PREFIX = "bench_delta_vs_base/"
SELF_COMPARISON_SCORE = 0.5  # win rate or preference accuracy of a model measured against itself: all ties


def open_study_run(uri: str, experiment: str, study: str, config: Mapping[str, Any]) -> tuple[str, str]:
    """(experiment_id, run_id) of the study's parent run, created or reopened; runs a killed driver left
    RUNNING are ended first. Logs the resolved config (params and config.yaml) and the environment tags."""
    client = records.client_for(uri)
    experiment_id = records.get_or_create_experiment(uri, experiment, client)
    for run in records.find_runs(uri, experiment_id, {STUDY_TAG: study}, status="RUNNING"):
        client.set_tag(run.info.run_id, CLOSED_BY_TAG, f"dpo study restart at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        client.set_terminated(run.info.run_id, status="KILLED")
    key_tags = {STUDY_TAG: study, ROLE_TAG: STUDY_ROLE}
    found = records.find_runs(uri, experiment_id, key_tags)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=f"study {study}", tags=key_tags).info.run_id
    records.log_params(client, run_id, config, {**records.environment_tags(), TRACKING_URI_TAG: uri})
    client.log_text(run_id, records.config_yaml(config), CONFIG_ARTIFACT)
    return experiment_id, run_id


def child_run(uri: str, experiment_id: str, parent_run_id: str, study: str, *, role: str, stage: str, arm: str,
              fingerprint: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """The study's child run for (role, stage, arm) with these settings (fingerprint), found by its tags or
    created, and RUNNING. Other settings (a stage deleted and rerun differently) get a run of their own."""
    client = records.client_for(uri)
    key_tags = {STUDY_TAG: study, ROLE_TAG: role, STAGE_TAG: stage, ARM_TAG: arm, STUDY_FINGERPRINT_TAG: fingerprint}
    found = records.find_runs(uri, experiment_id, key_tags)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        name = f"{role} {stage}" + ("" if arm == SHARED_ARM else f" {arm}")
        run_id = client.create_run(experiment_id, run_name=name, tags=key_tags).info.run_id
    records.log_params(client, run_id, params or {}, {PARENT_RUN_TAG: parent_run_id, **(tags or {})})
    return run_id


def end_child_run(uri: str, run_id: str, error: str | None = None) -> None:
    """A training or evaluation run ends FINISHED (or FAILED, with the error as a tag)."""
    records.end_run(uri, run_id, "FAILED" if error else "FINISHED", error=error)


def log_scores(uri: str, run_id: str, metrics: Mapping[str, float]) -> None:
    """Final values (step 0) in batches of at most 1000 metrics."""
    from mlflow.entities import Metric

    client = records.client_for(uri)
    now = int(time.time() * 1000)
    entries = [Metric(records.clean_key(key), float(value), now, 0) for key, value in metrics.items()]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start:start + 1000])


def start_baseline(start_scores: Mapping[str, float], relative_to_start: Collection[str] = ()) -> dict[str, float]:
    """What a model's score is compared with for bench_delta/<name>: the start model's own score, except for
    benchmarks measured against the start model itself (win_rate against start, preference_accuracy with
    reference start), where the start model scored the same way meets itself: SELF_COMPARISON_SCORE."""
    return {name: SELF_COMPARISON_SCORE if name in relative_to_start else value for name, value in start_scores.items()}


def bench_metrics(scores: Mapping[str, float], start_scores: Mapping[str, float] | None,
                  base_scores: Mapping[str, float] | None, relative_to_start: Collection[str] = ()) -> dict[str, float]:
    """bench/<name>, plus bench_delta/<name> (against start_baseline) and bench_delta_vs_base/<name>."""
    metrics = {f"{BENCH_PREFIX}{name}": value for name, value in scores.items()}
    start = start_baseline(start_scores, relative_to_start) if start_scores is not None else None
    for prefix, other in ((BENCH_DELTA_PREFIX, start), (BENCH_DELTA_VS_BASE_PREFIX, base_scores)):
        if other is not None:
            metrics.update({f"{prefix}{name}": value - other[name] for name, value in scores.items() if name in other})
    return metrics


def adopt_sweep_runs(uri: str, experiment_id: str, parent_run_id: str, sweep: str, arm: str) -> int:
    """Put an arm's sweep parent run under the study's parent and tag it and its trial runs with the arm."""
    runs = records.find_runs(uri, experiment_id, {SWEEP_TAG: sweep})
    for run in runs:
        tags = {ARM_TAG: arm, STAGE_TAG: DPO_STAGE}
        if run.data.tags.get(ROLE_TAG) == PARENT_ROLE:
            tags[PARENT_RUN_TAG] = parent_run_id
        records.set_tags(uri, run.info.run_id, tags)
    return len(runs)


def finish_study_run(uri: str, run_id: str, artifacts: Mapping[str, str], error: str | None = None) -> None:
    """Text artifacts (the table, the results JSON) on the parent run, then FINISHED or FAILED."""
    for name, text in artifacts.items():
        records.log_text_artifact(uri, run_id, name, text)
    records.end_run(uri, run_id, "FAILED" if error else "FINISHED", error=error)


def results_json(results: Mapping[str, Any]) -> str:
    """The results as JSON, secrets (a password in the tracking URI) redacted: it is written to disk and MLflow."""
    from orchestrator.redaction import redact

    return json.dumps(redact(dict(results)), indent=1, default=str)


# ---- the table -------------------------------------------------------------------------------------

ROW_LABELS = {"base": "base", "sft": "SFT", "dpo_only": "DPO-only", "sft_then_dpo": "SFT+DPO"}
ROW_ORDER = ("base", "sft", "dpo_only", "sft_then_dpo")
START_OF = {"sft": "base", "dpo_only": "base", "sft_then_dpo": "sft"}  # the model each one is trained from
LOWER_IS_BETTER_KINDS = ("perplexity",)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "-") + _number(abs(value))


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *[line(row) for row in rows]]


def study_table(scores: Mapping[str, Mapping[str, float]], benchmarks: Sequence[tuple[str, str]],
                relative_to_start: Collection[str] = ()) -> str:
    """The printed result. scores: model key (base, sft, dpo_only, sft_then_dpo) -> {benchmark: score};
    benchmarks: (name, kind) in config order; relative_to_start: benchmarks measured against the start model."""
    present = [key for key in ROW_ORDER if key in scores]
    names = [name for name, _ in benchmarks]
    header = ["model", *[name + (" (lower is better)" if kind in LOWER_IS_BETTER_KINDS else "") for name, kind in benchmarks]]
    rows = []
    for key in present:
        baseline = start_baseline(scores[START_OF[key]], relative_to_start) if START_OF.get(key) in scores else {}
        cells = [ROW_LABELS[key]]
        for name in names:
            value = scores[key][name]
            cells.append(_number(value) + (f" ({_signed(value - baseline[name])})" if name in baseline else ""))
        rows.append(cells)
    lines = ["Scores (in parentheses: change against the model it was trained from)", "", *_markdown(header, rows)]
    if relative_to_start:
        lines += ["", f"{', '.join(sorted(relative_to_start))}: measured against the model it was trained from, "
                  f"which scores {SELF_COMPARISON_SCORE} against itself"]
    if "base" in scores and len(present) > 1:
        delta_rows = [[f"{ROW_LABELS[key]} - base", *[_signed(scores[key][n] - scores["base"][n]) for n in names]]
                      for key in present if key != "base"]
        if "dpo_only" in scores and "sft_then_dpo" in scores:
            delta_rows.append(["SFT+DPO - DPO-only", *[_signed(scores["sft_then_dpo"][n] - scores["dpo_only"][n]) for n in names]])
        lines += ["", "Changes against the base model", "", *_markdown(["model", *names], delta_rows)]
    return "\n".join(lines)


def deltas(scores: Mapping[str, Mapping[str, float]], relative_to_start: Collection[str] = ()) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {"vs_start": {...}, "vs_base": {...}}} for every trained model whose start and base were scored."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for key, start in START_OF.items():
        if key not in scores:
            continue
        result[key] = {}
        others = {"vs_start": start_baseline(scores[start], relative_to_start) if start in scores else None,
                  "vs_base": scores.get("base")}
        for label, other in others.items():
            if other is not None:
                result[key][label] = {name: value - other[name] for name, value in scores[key].items() if name in other}
    return result
