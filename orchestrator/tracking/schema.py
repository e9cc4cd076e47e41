"""The MLflow records schema: every tag, run role, param and metric name that a writer sets and a
reader looks for, in one module imported by both sides.

Writers: orchestrator/tracking/records.py (sweep parent and trial runs), orchestrator/tracking/
trial_tracker.py (step metrics), orchestrator/workflows/study_records.py (study runs). Readers:
analysis/runs.py (runs -> pandas), orchestrator/workflows/export.py. Changing a name here changes it
for both sides at once; the MLflow runs of earlier versions keep the names they were written with.
Pure Python: no mlflow, no torch.

How runs are found again:
- a sweep's parent run: tags `sweep=<name>` and `dpo.role=parent`;
- a trial's child run: tags `trial_id=<id>` and `sweep=<name>` (plus `dpo.role=trial`,
  `mlflow.parentRunId`, `dpo.stage`, `dpo.arm` and `checkpoint_dir`);
- a study's parent run: tags `study=<name>` and `dpo.role=study`; its training and evaluation runs carry
  `dpo.role=train|evaluation`, `dpo.stage` and `dpo.arm`.
"""

from __future__ import annotations

from collections.abc import Mapping

# Names of sweeps, studies, experiments and benchmarks: they name folders, MLflow runs and metric keys.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"

# ---- tags ---------------------------------------------------------------------------------------------
SWEEP_TAG = "sweep"  # the sweep's name, on its parent run and every trial run
STUDY_TAG = "study"  # the study's name, on every run of a study
TRIAL_ID_TAG = "trial_id"  # Tune's trial id, on a trial run
ROLE_TAG = "dpo.role"
STAGE_TAG = "dpo.stage"  # base | sft | dpo
ARM_TAG = "dpo.arm"  # sft_then_dpo | dpo_only | shared
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent in the UI
CHECKPOINT_DIR_TAG = "checkpoint_dir"  # where Ray keeps the trial's checkpoints
ERROR_TAG = "error"  # the message of a failed run
DECISION_TAG, ROUND_TAG = "decision", "round"  # the incremental searcher's reason and round for a trial
REFERENCE_CACHE_KEY_TAG = "reference_cache_key"  # on the sweep's parent run
STUDY_FINGERPRINT_TAG = "study.fingerprint"
EXPORT_DIR_TAG, EXPORT_STEP_TAG = "export.dir", "export.checkpoint_step"  # on a trial run `dpo export` exported
GIT_COMMIT_TAG = "git.commit"  # HEAD of the code (with -dirty when files changed)
MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the commit the UI shows
VERSION_TAG_PREFIX = "version."  # version.<package> (python, torch, transformers, ray, mlflow, ...)
TRACKING_URI_TAG = "tracking_uri"  # on a parent run: where its runs were logged
RESUMED_AT_TAG = "resumed_at"  # on a run found again and reopened (--resume, a worker restart)
CLOSED_BY_TAG = "closed_by"  # on a run left RUNNING by a killed driver and ended by the next one
DATA_TAG_PREFIX = "data."  # data.<split>.sha256 / .path / .source on the parent run
# `dpo analyze`'s choice, on the sweep's parent run
ANALYSIS_METRIC_TAG, ANALYSIS_REASON_TAG = "analysis.metric", "analysis.reason"
ANALYSIS_CHOSEN_TRIAL_TAG, ANALYSIS_CHOSEN_BETA_TAG = "analysis.chosen_trial", "analysis.chosen_beta"
# MLflow 3's experiment type (an experiment tag): "Machine learning", so the UI opens on the runs table, not
# on the GenAI traces overview it shows an experiment of unknown type.
EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # a dataset input's role on a run: train | eval | sft_train

# ---- run roles (values of ROLE_TAG) -------------------------------------------------------------------
PARENT_ROLE = "parent"  # a sweep's parent run
TRIAL_ROLE = "trial"  # one Tune trial
STUDY_ROLE = "study"  # a study's parent run
TRAIN_ROLE = "train"  # a study's training stage
EVALUATION_ROLE = "evaluation"  # a study's benchmark evaluation

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# ---- params -------------------------------------------------------------------------------------------
# What a sweep searches, as the trial config key -> the dotted param of the resolved config it sets.
SEARCHED_PARAMS = {"beta": "dpo.beta", "kl_weight": "dpo.kl_weight", "learning_rate": "train.learning_rate"}
LOSS_PARAM = "dpo.loss"  # the loss dimension of a sweep (sweep.loss): a name, not a number

# ---- metrics ------------------------------------------------------------------------------------------
LOSS_METRIC = "train/loss"
DEFAULT_SCORE_METRIC = "eval/preference_accuracy"
WIN_RATE_METRIC = "eval/win_rate"
KL_METRIC = "eval/kl"
DROPPED_METRIC = "tracking/dropped_points"  # metric points a trial could not deliver
OUTAGE_METRIC = "tracking/outage_seconds"  # length of each tracking-server outage a trial lived through
# A sweep's parent run: its best trial's score and beta when the sweep ends, the chosen one after `dpo analyze`.
SWEEP_BEST_SCORE_METRIC, SWEEP_BEST_BETA_METRIC, SWEEP_TRIALS_METRIC = "sweep/best_score", "sweep/best_beta", "sweep/trials"
CHOSEN_BETA_METRIC, CHOSEN_SCORE_METRIC = "analysis/chosen_beta", "analysis/chosen_score"
BENCH_PREFIX, BENCH_DELTA_PREFIX = "bench/", "bench_delta/"

# ---- artifacts ----------------------------------------------------------------------------------------
DECISION_LOG_ARTIFACT = "decision_log.json"
SWEEP_SUMMARY_ARTIFACT = "sweep_summary.json"
CONFIG_ARTIFACT = "config.yaml"
SEARCH_SPACE_ARTIFACT = "search_space.json"
ANALYSIS_ARTIFACT_FOLDER = "analysis"  # `dpo analyze`'s report, on the sweep's parent run
EXPORTED_MODEL_ARTIFACT_FOLDER = "exported_model"  # `dpo export --register`'s LoggedModel name, of the trial run


def filter_value(value: str) -> str:
    """A quoted literal for an MLflow filter string (either quote character, never both)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for {value!r}: it contains both quote characters")


def tag_filter(tags: Mapping[str, str], status: str | None = None) -> str:
    """`tags.`sweep` = 'x' and tags.`dpo.role` = 'parent'`: runs carrying all these tags (and this status)."""
    clauses = [f"tags.`{key}` = {filter_value(value)}" for key, value in tags.items()]
    if status:
        clauses.append(f"attributes.status = {filter_value(status)}")
    return " and ".join(clauses)


def search_all_runs(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching the filter, following MLflow's pages (1000 runs a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=order_by or ["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs
