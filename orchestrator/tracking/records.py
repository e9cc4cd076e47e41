"""MLflow records of a sweep: one parent run per sweep, one child run per trial, secrets redacted.

Every call takes an explicit tracking URI (no global mlflow state). Tag, role and artifact names come from
orchestrator/tracking/schema.py, which the readers (analysis/, `dpo export`) import too. Runs are found
again by their tags, so `dpo sweep --resume` continues the same parent run (tags `sweep`,
`dpo.role=parent`) and each trial its own child run (tags `trial_id`, `sweep`), never a duplicate.
`close_stale_runs` ends runs left RUNNING by a killed driver. Params are the resolved config flattened to
dotted keys (values cut at MLflow's 6000 characters, sent 100 per call); keys that look like secrets and
passwords inside URIs are replaced by `***` before anything is logged (orchestrator/redaction.py, re-exported
here); `write_config_yaml` writes a run's config.yaml the same way, with mode 0600. Step metrics go through
orchestrator/tracking/trial_tracker.py (asynchronous).
Tests: `python -m pytest tests/test_tracking.py -q` (server tests marked `mlflow`).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from orchestrator.redaction import REDACTED, is_secret_key, redact, write_private_text  # noqa: F401 - re-exported
from orchestrator.tracking.schema import (ARM_TAG, CHECKPOINT_DIR_TAG, CLOSED_BY_TAG, CONFIG_ARTIFACT, DATA_TAG_PREFIX,
                                          DATASET_CONTEXT_TAG, ERROR_TAG, EXPERIMENT_KIND_TAG, GIT_COMMIT_TAG,
                                          MLFLOW_GIT_COMMIT_TAG, PARENT_ROLE, PARENT_RUN_TAG, RESUMED_AT_TAG, ROLE_TAG,
                                          SEARCH_SPACE_ARTIFACT, STAGE_TAG, SWEEP_TAG, TERMINAL_STATUSES,
                                          TRACKING_URI_TAG, TRAINING_EXPERIMENT_KIND, TRIAL_ID_TAG, TRIAL_ROLE,
                                          VERSION_TAG_PREFIX, search_all_runs, tag_filter)

logger = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
PARAMS_PER_CALL = 100  # MAX_PARAMS_TAGS_PER_BATCH
PACKAGES = ("torch", "transformers", "ray", "mlflow", "datasets", "tokenizers", "peft", "trl")


# ---- redaction and flattening (pure) ----------------------------------------------------------

def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Each value redacted by its (dotted) key and its content."""
    return {key: redact(value, key) for key, value in params.items()}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


def clean_key(key: str) -> str:
    """An MLflow-safe key: letters, digits, `_ - . / space` and `:` kept, anything else becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_\-./ :]", "_", key)[:MAX_KEY_LENGTH]


def flatten_params(nested: Mapping[str, Any]) -> dict[str, str]:
    """{"dpo": {"beta": 0.1}} -> {"dpo.beta": "0.1"}; lists as JSON; secrets redacted; values cut to 6000 chars."""
    from orchestrator.config.spec import flatten

    flat: dict[str, str] = {}
    for name, value in flatten(nested).items():
        text = _as_text(redact(value, name))
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 15] + "...(truncated)"
        flat[clean_key(name)] = text
    return flat


def tag_text(value: Any, key: str) -> str:
    text = _as_text(redact(value, key))
    return text if len(text) <= MAX_TAG_VALUE_LENGTH else text[: MAX_TAG_VALUE_LENGTH - 15] + "...(truncated)"


def config_yaml(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML, secrets redacted (the parent run's config.yaml artifact)."""
    return yaml.safe_dump(redact(dict(config)), sort_keys=False)


def write_config_yaml(path: str | Path, config: Mapping[str, Any]) -> Path:
    """A run's config.yaml on disk: the resolved config, secrets redacted, mode 0600, never through a symlink."""
    return write_private_text(path, config_yaml(config))


# ---- environment --------------------------------------------------------------------------------

def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages a result depends on (missing ones left out)."""
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD of the repository holding this code (with `-dirty` when files changed), or None outside git."""
    where = Path(path) if path else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def environment_tags() -> dict[str, str]:
    """`git.commit`, `mlflow.source.git.commit` (shown by the UI) and `version.<package>` tags."""
    tags = {f"{VERSION_TAG_PREFIX}{name}": version for name, version in package_versions().items()}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags[MLFLOW_GIT_COMMIT_TAG] = commit.removesuffix("-dirty")
    return tags


def data_fingerprints(sources: Mapping[str, str | None]) -> dict[str, str]:
    """{"train": "/data/pairs.jsonl"} -> {"data.train.sha256": "<hex>"}; hub names (not local files) -> `data.train.source`."""
    from trainables.data_sources import dataset_fingerprint

    tags: dict[str, str] = {}
    for name, source in sources.items():
        if not source:
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            tags[f"{DATA_TAG_PREFIX}{name}.source"] = str(redact(source))
            continue
        tags[f"{DATA_TAG_PREFIX}{name}.sha256"] = dataset_fingerprint(source)
        tags[f"{DATA_TAG_PREFIX}{name}.path"] = str(path.resolve())
    return tags


def dataset_inputs(sources: Mapping[str, str | None]) -> list:
    """MLflow dataset inputs of local data files: {"train": "/data/pairs.jsonl"} -> a DatasetInput named after
    the file, its digest the file's sha256 (the `data.<split>.sha256` tag's), its role in the context tag.
    Sources that are not local files (hub names) get a digest of their name, so the UI still lists them."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from trainables.data_sources import dataset_fingerprint

    inputs = []
    for role, source in sources.items():
        if not source:
            continue
        path = Path(source).expanduser()
        local = path.is_file()
        shown = str(path.resolve()) if local else str(redact(source))
        digest = dataset_fingerprint(source) if local else hashlib.sha256(shown.encode()).hexdigest()
        dataset = Dataset(name=path.stem if local else shown, digest=digest[:36],  # MLflow keeps 36 characters
                          source_type="local" if local else "hub", source=json.dumps({"uri": shown}),
                          profile=json.dumps({"sha256": digest}))
        inputs.append(DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, role)]))
    return inputs


def log_dataset_inputs(uri: str, run_id: str, sources: Mapping[str, str | None]) -> None:
    """The run's data sets as MLflow dataset inputs (the runs table's Dataset column), with their digests."""
    inputs = dataset_inputs(sources)
    if inputs:
        client_for(uri).log_inputs(run_id, datasets=inputs)


def log_summary_metrics(uri: str, run_id: str, metrics: Mapping[str, float | None]) -> None:
    """Metrics of a whole sweep on its parent run (the best score, the chosen beta); non-numbers skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [Metric(key, float(value), now, 0) for key, value in metrics.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value]
    if points:
        client_for(uri).log_batch(run_id, metrics=points)


# ---- runs ---------------------------------------------------------------------------------------

def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str, client=None) -> str:
    """Experiment id of `name`, created (or restored from the trash) if needed; safe against concurrent creators."""
    from mlflow.exceptions import MlflowException

    client = client or client_for(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
        except MlflowException as error:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise error
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # a kind the user chose in the UI is kept
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return experiment.experiment_id


def log_params(client, run_id: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None) -> None:
    """Params (flattened, redacted) and tags in log_batch calls of at most 100 each; params already on the run are skipped."""
    from mlflow.entities import Param, RunTag

    existing = client.get_run(run_id).data.params
    flat = flatten_params(params)
    changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
    if changed:
        logger.warning("run %s already has different values for %s; MLflow params cannot change, kept the old ones", run_id, changed[:10])
    param_list = [Param(k, v) for k, v in flat.items() if k not in existing]
    tag_list = [RunTag(clean_key(k), tag_text(v, k)) for k, v in (tags or {}).items() if v is not None]
    for start in range(0, max(len(param_list), len(tag_list)), PARAMS_PER_CALL):
        client.log_batch(run_id, params=param_list[start:start + PARAMS_PER_CALL], tags=tag_list[start:start + PARAMS_PER_CALL])


def find_runs(uri: str, experiment_id: str, tags: Mapping[str, str], status: str | None = None) -> list:
    """Runs of the experiment carrying all these tags (optionally in this status), oldest first."""
    return search_all_runs(client_for(uri), [experiment_id], tag_filter(tags, status))


def _find_or_create(client, experiment_id: str, key_tags: dict[str, str], run_name: str,
                    params: Mapping[str, Any], tags: dict[str, Any]) -> tuple[str, bool]:
    """(run_id, created): the oldest run with key_tags, reopened as RUNNING, or a new one."""
    found = search_all_runs(client, [experiment_id], tag_filter(key_tags))
    if found:
        run_id = found[0].info.run_id
        if len(found) > 1:
            logger.warning("%d runs carry tags %s; continuing the oldest, %s", len(found), key_tags, run_id)
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        tags = {**tags, RESUMED_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%S")}
        created = False
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={**key_tags}).info.run_id
        created = True
    log_params(client, run_id, params, tags)
    return run_id, created


def start_parent_run(uri: str, experiment: str, sweep: str, config: Mapping[str, Any], *,
                     search_space: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                     artifacts: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(experiment_id, run_id) of the sweep's parent run, created or (after --resume) reopened.

    Logs the resolved config as params and as config.yaml, the search space (search_space.json), the
    environment tags (git commit, package versions) and the caller's tags (data fingerprints,
    reference-cache key, ...) and text artifacts {file name: text}.
    """
    client = client_for(uri)
    experiment_id = get_or_create_experiment(uri, experiment, client)
    all_tags = {**environment_tags(), **(tags or {}), TRACKING_URI_TAG: uri}
    run_id, _ = _find_or_create(client, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: PARENT_ROLE}, sweep, config, all_tags)
    files = {CONFIG_ARTIFACT: config_yaml(config), **(artifacts or {})}
    if search_space is not None:
        files[SEARCH_SPACE_ARTIFACT] = json.dumps(redact(dict(search_space)), indent=1, default=str)
    for name, text in files.items():
        client.log_text(run_id, str(redact(text)), name)
    return experiment_id, run_id


def find_or_create_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str, sweep: str,
                             params: Mapping[str, Any], tags: Mapping[str, Any] | None = None, *,
                             stage: str = "dpo", arm: str | None = None, checkpoint_dir: str | None = None) -> str:
    """The trial's child run (tag mlflow.parentRunId), found by its trial_id + sweep tags or created.

    params: e.g. {"beta": 0.2, "kl_weight": 0.0, "learning_rate": 1e-4, **resolved_config}; nested dicts
    are flattened. checkpoint_dir is recorded as the tag `checkpoint_dir` (where Ray keeps this trial's
    checkpoints). Calling it again (worker restart, --resume) returns the same run, reopened as RUNNING.
    """
    client = client_for(uri)
    all_tags = {**environment_tags(), **(tags or {}), PARENT_RUN_TAG: parent_run_id, ROLE_TAG: TRIAL_ROLE,
                STAGE_TAG: stage, ARM_TAG: arm, CHECKPOINT_DIR_TAG: checkpoint_dir}
    run_id, _ = _find_or_create(client, experiment_id, {TRIAL_ID_TAG: trial_id, SWEEP_TAG: sweep}, trial_id, params,
                                all_tags)
    return run_id


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags added later (e.g. the reference-cache key once computed), redacted, 100 per call."""
    log_params(client_for(uri), run_id, {}, tags)


ARTIFACT_ATTEMPTS = 3  # uploads of one text artifact, each read back and compared, before giving up


def log_text_artifact(uri: str, run_id: str, file_name: str, text: str, *, retry_wait_s: float = 1.0) -> bool:
    """A text artifact (e.g. decision_log.json at the end of the sweep), secrets redacted; True once stored.

    Each upload is read back from the artifact store and compared byte for byte; a failed or corrupted
    upload (a proxy cutting the body, a store writing part of it) is retried, up to ARTIFACT_ATTEMPTS
    uploads with a growing wait. If none arrives intact the failure is logged and False returned: the
    sweep goes on (its summary is also written to the sweep folder).
    """
    import tempfile

    client, content = client_for(uri), str(redact(text))
    problem = ""
    for attempt in range(1, ARTIFACT_ATTEMPTS + 1):
        try:
            client.log_text(run_id, content, file_name)
            with tempfile.TemporaryDirectory(prefix="dpo-artifact-check-") as folder:
                stored = Path(client.download_artifacts(run_id, file_name, folder)).read_text(encoding="utf-8")
            if stored == content:
                return True
            problem = f"the stored copy differs ({len(stored)} of {len(content)} characters)"
        except Exception as error:  # noqa: BLE001 - any failure of the store is retried, then logged
            problem = f"{type(error).__name__}: {redact(str(error))[:300]}"
        if attempt < ARTIFACT_ATTEMPTS:
            logger.warning("MLflow run %s: artifact %s upload %d of %d failed (%s); retrying", run_id, file_name,
                           attempt, ARTIFACT_ATTEMPTS, problem)
            time.sleep(retry_wait_s * 2 ** (attempt - 1))
    logger.error("MLflow run %s: artifact %s not stored after %d uploads (%s); going on without it", run_id, file_name,
                 ARTIFACT_ATTEMPTS, problem)
    return False


def end_run(uri: str, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED; a failure's message is kept in the `error` tag."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
    client = client_for(uri)
    if error:
        client.set_tag(run_id, ERROR_TAG, tag_text(error, ERROR_TAG))
    client.set_terminated(run_id, status=status)


def close_stale_runs(uri: str, experiment: str, sweep: str, status: str = "KILLED", keep: Iterable[str] = ()) -> int:
    """End every run of this sweep still RUNNING, except the run ids in `keep`; returns how many.

    On --resume call it before reopening the parent run (runs left by a killed driver; the trials that
    resume reopen their own runs). After tuner.fit(), call it with keep=[parent_run_id] to end the runs of
    trials Tune stopped early (ASHA) or killed, whose trial function never got to end its run.
    """
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    keep = set(keep)
    stale = [run for run in search_all_runs(client, [found.experiment_id], tag_filter({SWEEP_TAG: sweep}, "RUNNING"))
             if run.info.run_id not in keep]
    for run in stale:
        client.set_tag(run.info.run_id, CLOSED_BY_TAG, f"close_stale_runs at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        client.set_terminated(run.info.run_id, status=status)
    if stale:
        logger.info("marked %d stale RUNNING runs of sweep %s as %s", len(stale), sweep, status)
    return len(stale)
