"""The storage layout: every path of a sweep, a study and a single-process run, derived in one place.

    <storage_path>/mlflow/                      the embedded MLflow server (database, artifacts, log)
    <storage_path>/<name>/                      the Tuner's experiment folder (searcher state, Tune's files)
    <storage_path>/<name>/sweep_summary.json    best trial, every trial's final metrics, decision log
    <storage_path>/<name>/reference_cache/      precomputed reference log-probs (default of reference.cache_dir)
    <storage_path>/<name>/data/tokens-<key>/    the tokenised pairs, memory-mapped by every trial (token_stores)
    <storage_path>/<name>/analysis/             `dpo analyze`'s report
    <storage_path>/<name>/<trial_id>/           each trial's Tune folder; a warm trial's checkpoints (checkpoint_*/)
    <storage_path>/<name>-trials/<trial_id>/    a Ray Train trial's run and its checkpoints (multi-worker trials)
    <storage_path>/<name>/{sft,sft_then_dpo,dpo_only}/model/   a study's stage models (+ STAGE_*.json)
    <storage_path>/<name>/train-jobs/, evaluations/             a study's Ray Train jobs and evaluations
    <output_dir>/metrics.jsonl, config.yaml, checkpoints/step-NNNNNN/    `dpo train` / `dpo sft`
    <output_dir>/run.json, run.lock             whose run the folder holds; the lock of the run in progress

storage_path may be a local or shared folder or an object-store URI (s3://...); what needs a filesystem
(the embedded MLflow server, the reference cache, study stages) says so with a ConfigError. Nothing
else in the code builds one of these paths by hand. Pure Python: no torch, no ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError, TrackingConfigError

DEFAULT_REFERENCE_CACHE = "~/.cache/dpo-orchestrator/reference"  # `dpo train` without reference.cache_dir
CHECKPOINT_MANIFEST = "manifest.json"  # written last into every complete engine checkpoint (trainables/checkpointing.py)


def is_remote(location: str) -> bool:
    """An object-store or other URI (s3://, gs://, ...) rather than a filesystem path."""
    return "://" in location


def resolve_storage(storage_path: str) -> str:
    """A URI as given; a local path absolute, with ~ expanded (so Ray and every worker agree on it)."""
    if is_remote(storage_path):
        return storage_path.rstrip("/")
    return str(Path(storage_path).expanduser().resolve())


def mlflow_root(storage_path: str) -> Path:
    """<storage_path>/mlflow: the embedded MLflow server's database, artifacts, state and log."""
    if is_remote(storage_path):
        raise TrackingConfigError(
            f"storage_path {storage_path!r} is an object store, where the embedded MLflow server cannot keep its "
            "SQLite file: set tracking.uri (or MLFLOW_TRACKING_URI) to a running MLflow server, e.g. http://head-node:5000")
    return Path(resolve_storage(storage_path)) / "mlflow"


@dataclass(frozen=True)
class StorageLayout:
    """Where one named sweep (or study) keeps everything under its storage_path."""

    storage: str  # resolve_storage(storage_path)
    name: str
    reference_cache_dir: str | None = None  # reference.cache_dir when set; else under the sweep's folder
    trial_mode: str | None = None  # how the sweep runs trials: warm | train (None: unknown, see trial_dir)

    @classmethod
    def of(cls, storage_path: str, name: str, reference_cache_dir: str | None = None,
           trial_mode: str | None = None) -> "StorageLayout":
        return cls(resolve_storage(storage_path), name, reference_cache_dir, trial_mode)

    @property
    def remote(self) -> bool:
        return is_remote(self.storage)

    @property
    def root(self) -> str:
        """The Tuner's experiment folder (and a study's root)."""
        return f"{self.storage}/{self.name}"

    @property
    def trials(self) -> str:
        """Where each Ray Train trial's run lives (one folder per trial id; trial_mode train only)."""
        return f"{self.root}-trials"

    def trial_dir(self, trial_id: str) -> str:
        """The folder holding a trial's checkpoints (checkpoint_*/ one level down).

        A warm trial reports its checkpoints to Tune, which keeps them in the trial's Tune folder
        <root>/<trial_id>; a Ray Train trial keeps them in its TorchTrainer's run, <name>-trials/<trial_id>.
        A layout that does not know the mode (made from a storage path and a name, as `dpo export
        --storage-path` does) takes the Ray Train run when that folder exists, else the Tune folder.
        """
        warm, train = f"{self.root}/{trial_id}", f"{self.trials}/{trial_id}"
        if self.trial_mode is None:
            return train if not self.remote and Path(train).is_dir() else warm
        return warm if self.trial_mode == "warm" else train

    def ran_trials_as(self) -> str | None:
        """The trial mode a sweep already stored here ran with (warm | train), None when unknown or new:
        a Ray Train sweep leaves <name>-trials/, a warm one checkpoints in its Tune trial folders."""
        if self.remote:
            return None
        if Path(self.trials).is_dir():
            return "train"
        if any(Path(self.root).glob(f"*/checkpoint_*/{CHECKPOINT_MANIFEST}")):
            return "warm"
        return None

    @property
    def reference_cache(self) -> str:
        if self.reference_cache_dir:
            return self.reference_cache_dir
        if self.remote:
            raise ConfigError("reference.cache_dir: with an object-store storage_path, set it to a shared filesystem path")
        return f"{self.root}/reference_cache"

    @property
    def token_stores(self) -> str | None:
        """data/: the sweep's token stores, tokens-<key>/ each (trainables/token_store.py). None in object storage,
        which cannot be memory-mapped: the driver then hands the pairs to the trials through Ray's object store."""
        return None if self.remote else f"{self.root}/data"

    @property
    def mlflow_root(self) -> Path:
        return mlflow_root(self.storage)

    @property
    def summary_file(self) -> Path | None:
        """sweep_summary.json (None in object storage: it is logged to MLflow instead)."""
        return None if self.remote else Path(self.root) / "sweep_summary.json"

    @property
    def analysis_dir(self) -> Path:
        return Path(f"{self.name}-analysis").resolve() if self.remote else Path(self.root) / "analysis"

    @property
    def console_log(self) -> Path:
        """console.log: Ray's and the workers' output of `dpo sweep|quickstart|study` (orchestrator/console.py)."""
        return Path(f"{self.name}-console.log").resolve() if self.remote else Path(self.root) / "console.log"

    @property
    def config_file(self) -> Path | None:
        """config.yaml: the sweep's resolved config (secrets redacted), compared on --resume (config_change.py)."""
        return None if self.remote else Path(self.root) / "config.yaml"

    @property
    def metric_journals(self) -> Path | None:
        """metric_journal/: each trial run's journal of metric points (orchestrator/tracking/metric_journal.py);
        None in object storage, where a file cannot be appended to."""
        return None if self.remote else Path(self.root) / "metric_journal"

    def searcher_states(self) -> list[Path]:
        """The incremental searcher's saved states, oldest first by name (the name holds the session start)."""
        return [] if self.remote else sorted(Path(self.root).glob("searcher-state-*"))

    def exists(self) -> bool:
        """Whether a sweep of this name has run here (unknown, so True, for object storage)."""
        return self.remote or Path(self.root).is_dir()

    # ---- a study's folders (filesystem only: stages hand model folders to each other) ----------------

    def require_filesystem(self, what: str) -> Path:
        if self.remote:
            raise ConfigError(f"storage_path: {what} needs a local or shared filesystem path, not {self.storage}")
        return Path(self.root)

    @property
    def train_jobs(self) -> Path:
        return self.require_filesystem("`dpo study`") / "train-jobs"

    @property
    def evaluations(self) -> Path:
        return self.require_filesystem("`dpo study`") / "evaluations"

    def stage_dir(self, stage: str) -> Path:
        return self.require_filesystem("`dpo study`") / stage

    def arm_sweep(self, arm: str) -> "StorageLayout":
        """The sweep a study arm in `mode: sweep` runs: named <name>-<arm>, stored inside the study's folder."""
        return StorageLayout(self.root, f"{self.name}-{arm}", self.reference_cache)


@dataclass(frozen=True)
class OutputLayout:
    """What a single-process run (`dpo train`, `dpo sft`, a study stage) writes under output_dir.

    run.json (the run's record, written first) and run.lock (held while it runs) say whose folder it is;
    orchestrator/workflows/output_dir.py refuses a run whose outputs would replace another run's or an input.
    """

    output_dir: str

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    @property
    def files(self) -> tuple[Path, ...]:
        """The plain files a run writes (checkpoints/ aside)."""
        return self.metrics_file, self.config_file, self.run_file, self.lock_file

    @property
    def results(self) -> tuple[Path, ...]:
        """What makes the folder hold a run: its results, whose loss a later run must not cause."""
        return self.metrics_file, self.config_file, self.checkpoints


def find_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint folder) of every engine checkpoint one or two levels below `folder`, by step.

    One level: a Ray Train run folder (<trial>/checkpoint_*/) or an engine output's checkpoints/; two
    levels: a trial folder holding Ray Train runs. A checkpoint counts when its manifest names its step
    and it holds model/; staging and hidden folders never count.
    """
    found = []
    for manifest in list(folder.glob(f"*/{CHECKPOINT_MANIFEST}")) + list(folder.glob(f"*/*/{CHECKPOINT_MANIFEST}")):
        checkpoint = manifest.parent
        if checkpoint.name.startswith(".") or not (checkpoint / "model").is_dir():
            continue
        try:
            step = int(json.loads(manifest.read_text())["step"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        found.append((step, checkpoint))
    return sorted(found, key=lambda item: (item[0], str(item[1])))
