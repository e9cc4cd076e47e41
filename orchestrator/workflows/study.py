"""`dpo study`: SFT-then-DPO versus DPO-only with downstream benchmark deltas, one resumable Ray pipeline.

    base model --SFT--> SFT model --DPO--> SFT+DPO      (arm sft_then_dpo; the DPO reference is the SFT model)
    base model --DPO--> DPO-only                        (arm dpo_only; the DPO reference is the base model)

Order of work: validate the config, every stage's run spec, the training data and every benchmark's
data (before Ray or a server starts) -> start or join Ray -> the study's MLflow parent run -> evaluate
the base model (a Ray task) -> the SFT stage (a Ray Train job) -> each arm's DPO (a Ray Train job with
fixed values, or a sweep of its own; see orchestrator/ray/jobs.py) -> each new model is evaluated by a
Ray task as soon as it exists, while the next stage trains -> every evaluation is recorded as an MLflow
run with its deltas (orchestrator/workflows/study_records.py) -> the result table is printed and logged
on the parent run, and written with the raw results into the study's folder.

Each stage's config is the study's config with the stage's start model and overrides (stage_experiment,
validated here: this is the study's edge), resolved into the RunSpec its Ray Train job runs. Every path
comes from the study's StorageLayout (orchestrator/config/layout.py): `<storage_path>/<name>/` holds
<stage>/model/ with STAGE_COMPLETE.json (stages: sft, sft_then_dpo, dpo_only), evaluations/<model>.json,
train-jobs/, reference_cache/ and an arm's sweep `<name>-<arm>`.
Resumable: rerunning the command (or `--resume`) skips what is complete, and an interrupted training job
continues from its last checkpoint. A stage that was started with other settings is an error, not
silently reused.
Run: `dpo study configs/quickstart-study.yaml [--set k=v ...] [--address auto] [--resume]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.layout import StorageLayout
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.spec import Resources, RunSpec, resolve_experiment, resolve_run
from orchestrator.config.study_schema import ARMS, arm_sections, sft_train_section
from orchestrator.errors import ConfigError
from orchestrator.tracking.schema import EVALUATION_ROLE, TRAIN_ROLE
from orchestrator.workflows import study_records
from orchestrator.workflows.study_records import DPO_STAGE, SHARED_ARM, START_OF, deltas, study_table

logger = logging.getLogger(__name__)

COMPLETE_FILE, STARTED_FILE = "STAGE_COMPLETE.json", "STAGE_STARTED.json"
RESULTS_FILE, TABLE_FILE = "study_results.json", "study_table.md"
MODEL_FOLDER = "model"  # <stage_dir>/model: the stage's result, copied out of its job's checkpoint
STAGE_AND_ARM = {"base": ("base", SHARED_ARM), "sft": ("sft", "sft_then_dpo"),
                 "sft_then_dpo": (DPO_STAGE, "sft_then_dpo"), "dpo_only": (DPO_STAGE, "dpo_only")}


@dataclass(frozen=True)
class StudyTracking:
    """Where a study records: a tracking URI that is already usable, and the MLflow experiment's name."""

    uri: str
    experiment: str


def study_layout(config: ExperimentConfig) -> StorageLayout:
    """The study's folders; a filesystem path is required (the stages hand model folders to each other)."""
    layout = StorageLayout.of(config.storage_path, config.name, config.reference.cache_dir)
    layout.require_filesystem("`dpo study` (its stages hand model folders to each other)")
    return layout


def study_stages(config: ExperimentConfig) -> list[str]:
    """The training stages the config's arms need, in the order they run."""
    arms = config.study.arms
    return (["sft"] if "sft_then_dpo" in arms else []) + [arm for arm in ARMS if arm in arms]


def stage_experiment(config: ExperimentConfig, stage: str, start_model: str, layout: StorageLayout,
                     tracking: StudyTracking | None) -> ExperimentConfig:
    """The config one stage trains with: starts from (and, for DPO, is referenced to) start_model."""
    raw = config.model_dump()
    raw["model"]["path"] = start_model
    raw["reference"]["path"] = start_model
    raw["reference"]["cache_dir"] = layout.reference_cache
    raw["output_dir"] = str(layout.stage_dir(stage) / "outputs")
    if stage == "sft":
        raw["train"] = sft_train_section(config)
    else:
        raw.update(arm_sections(config, stage))
        sweep = layout.arm_sweep(stage)  # where its sweep (mode: sweep) lives: <name>-<arm> inside the study
        raw["name"], raw["storage_path"] = sweep.name, sweep.storage
        raw["tracking"] = {"enabled": tracking is not None, "uri": tracking.uri if tracking else None,
                           "experiment": tracking.experiment if tracking else None}
    return ExperimentConfig.model_validate(raw)


def stage_run(experiment: ExperimentConfig, stage: str) -> RunSpec:
    """The RunSpec of a fixed-value stage's Ray Train job (the SFT stage, or an arm's DPO in mode fixed)."""
    return resolve_run(experiment, stage="sft" if stage == "sft" else "dpo",
                       workers=experiment.resources.num_workers, reference_cache=experiment.reference.cache_dir,
                       output_dir=str(experiment.output_dir), show_progress=False)


def stage_mode(config: ExperimentConfig, stage: str) -> str:
    return "fixed" if stage == "sft" else getattr(config.study, stage).mode


RESULT_TRAIN_KEYS = ("learning_rate", "batch_size", "max_steps", "warmup_steps", "schedule", "weight_decay",
                     "max_grad_norm", "seed", "precision")  # what changes a trained model (not logging or eval cadence)
SFT_DATA_KEYS = ("sft_train", "sft_eval", "columns", "max_length", "max_prompt_length", "drop_invalid", "max_invalid_fraction")


def stage_fingerprint(experiment: ExperimentConfig, stage: str, mode: str) -> str:
    """What decides a stage's result: the start model, its data, the objective and the training values."""
    dumped = experiment.model_dump()
    relevant = {"model": dumped["model"], "mode": mode, "train": {k: dumped["train"][k] for k in RESULT_TRAIN_KEYS}}
    if stage == "sft":
        relevant["data"] = {key: dumped["data"][key] for key in SFT_DATA_KEYS}
    else:
        relevant.update(data=dumped["data"], dpo=dumped["dpo"], reference_mode=dumped["reference"]["mode"],
                        sweep=dumped["sweep"] if mode == "sweep" else None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _check_same_settings(stage_dir: Path, fingerprint: str) -> None:
    for file in (COMPLETE_FILE, STARTED_FILE):
        recorded = _read_json(stage_dir / file)
        if recorded and recorded.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"study stage {stage_dir.name} in {stage_dir} was run with other settings (fingerprint "
                f"{recorded.get('fingerprint')}, now {fingerprint}); give the study a new `name`, or delete "
                f"{stage_dir} (and the stages after it) to run it again")


def copy_model(source: str, destination: Path) -> str:
    """Copy a model folder into place atomically (staging folder, then rename); returns the destination."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        shutil.copytree(source, staging / MODEL_FOLDER)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging / MODEL_FOLDER, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(destination)


class Study:
    """One run of the pipeline; holds the layout, the MLflow ids and the evaluations in flight."""

    def __init__(self, config: ExperimentConfig, tracking_uri: str | None, address: str | None = None):
        self.config, self.layout, self.address = config, study_layout(config), address
        self.started_ray = False  # Ray starts with the first stage or evaluation left to do
        self.tracking = StudyTracking(tracking_uri, config.tracking.experiment or config.name) if tracking_uri else None
        self.experiment_id = self.parent_run_id = None
        self.benchmarks = study_benchmarks(config)
        self.relative_to_start = {entry["name"] for entry in self.benchmarks  # measured against the start model
                                  if entry.get("against", entry.get("reference")) == "start"}
        self.models: dict[str, str] = {}  # model key -> model folder
        self.pending: dict[str, Any] = {}  # model key -> Ray ObjectRef of its scores
        self.scores: dict[str, dict[str, float]] = {}

    @property
    def resources(self) -> Resources:
        """What one training job asks Ray for (the study's resources section; the same for every stage)."""
        return resolve_run(self.config, reference_cache=self.layout.reference_cache).resources

    def ensure_ray(self) -> None:
        import ray

        from orchestrator.ray.cluster import check_layout_is_shared, start_ray

        if not ray.is_initialized():
            start_ray(self.address, self.resources)
            self.started_ray = True
            if self.address:  # stages and evaluations may land on other nodes: what they share must be shared
                check_layout_is_shared(self.layout, self.config.tracking.uri, self.config.tracking.enabled)

    def train(self, stage: str, start_model: str) -> str:
        """Run (or skip, when complete) one training stage; returns its model folder."""
        from orchestrator.ray.jobs import fit_training_job, run_arm_sweep

        experiment = stage_experiment(self.config, stage, start_model, self.layout, self.tracking)
        mode = stage_mode(self.config, stage)
        stage_dir, fingerprint = self.layout.stage_dir(stage), stage_fingerprint(experiment, stage, mode)
        _check_same_settings(stage_dir, fingerprint)
        done = _read_json(stage_dir / COMPLETE_FILE)
        if done and Path(done["model"], "config.json").is_file():
            logger.info("study stage %s is complete (%s); skipped", stage, done["model"])
            return done["model"]
        self.ensure_ray()
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / STARTED_FILE).write_text(json.dumps({"fingerprint": fingerprint, "start_model": start_model}))
        started = time.monotonic()
        name, arm = STAGE_AND_ARM[stage]
        if mode == "sweep":
            source, summary = run_arm_sweep(experiment)
            if self.tracking:
                study_records.adopt_sweep_runs(self.tracking.uri, self.experiment_id, self.parent_run_id,
                                               experiment.name, arm)
            extra = {"sweep_best": summary.get("best")}
        else:
            spec = stage_run(experiment, stage)
            run_id = None
            if self.tracking:
                run_id = study_records.child_run(
                    self.tracking.uri, self.experiment_id, self.parent_run_id, self.config.name, role=TRAIN_ROLE,
                    stage=name, arm=arm, fingerprint=fingerprint, params=spec.param_dict(),
                    tags={"start_model": start_model})
            source = fit_training_job(spec, name=stage, storage=str(self.layout.train_jobs),
                                      tracking_uri=self.tracking.uri if run_id else None, run_id=run_id)
            if run_id:
                study_records.end_child_run(self.tracking.uri, run_id)
            extra = {}
        model_dir = copy_model(source, stage_dir / MODEL_FOLDER)
        seconds = time.monotonic() - started
        marker = {"stage": stage, "model": model_dir, "source": source, "start_model": start_model, "mode": mode,
                  "fingerprint": fingerprint, "seconds": round(seconds, 1), **extra}
        (stage_dir / COMPLETE_FILE).write_text(json.dumps(marker, indent=1, default=str))
        logger.info("study stage %s done in %.0f s: %s", stage, seconds, model_dir)
        return model_dir

    def evaluation_fingerprint(self, key: str) -> str:
        stage_marker = _read_json(self.layout.stage_dir(key) / COMPLETE_FILE) or {}
        content = [self.benchmarks, self.models[key], self.comparisons(key), stage_marker.get("fingerprint")]
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def comparisons(self, key: str) -> dict[str, str]:
        return {"start": self.models[START_OF.get(key, "base")], "base": self.models["base"]}

    def evaluate(self, key: str, model_dir: str) -> None:
        """Start the Ray task that scores one model (unless a matching result is on disk)."""
        import ray

        from trainables.benchmarks.base import evaluate_model

        self.models[key] = model_dir
        recorded = _read_json(self.layout.evaluations / f"{key}.json")
        if recorded and recorded.get("fingerprint") == self.evaluation_fingerprint(key):
            self.scores[key] = recorded["scores"]
            return
        self.ensure_ray()
        study, model = self.config.study, self.config.model
        options = {"num_cpus": study.eval_cpus, "num_gpus": study.eval_gpus}
        self.pending[key] = ray.remote(evaluate_model).options(**options).remote(
            model_dir, self.benchmarks, tokenizer_path=model.tokenizer_path, comparison_paths=self.comparisons(key),
            device="cuda" if study.eval_gpus else "cpu", dtype=model.dtype, trust_remote_code=model.trust_remote_code,
            threads=max(1, int(study.eval_cpus)))

    def collect(self, wait: bool = True) -> None:
        """Write the results of finished evaluations to disk; with wait, first wait for all of them."""
        import ray

        if not self.pending:
            return
        references = list(self.pending.values())
        done, _ = ray.wait(references, num_returns=len(references), timeout=None if wait else 0)
        self.layout.evaluations.mkdir(parents=True, exist_ok=True)
        for key, reference in list(self.pending.items()):
            if reference in done:
                self.scores[key] = ray.get(reference)
                record = {"model": self.models[key], "scores": self.scores[key], "fingerprint": self.evaluation_fingerprint(key)}
                (self.layout.evaluations / f"{key}.json").write_text(json.dumps(record, indent=1))
                del self.pending[key]

    def record_evaluations(self) -> None:
        """One MLflow run per evaluated model: bench/, bench_delta/ and bench_delta_vs_base/ metrics."""
        uri = self.tracking.uri
        for key, scores in self.scores.items():
            stage, arm = STAGE_AND_ARM[key]
            start = START_OF.get(key)
            metrics = study_records.bench_metrics(scores, self.scores.get(start) if start else None,
                                                  self.scores.get("base") if key != "base" else None,
                                                  self.relative_to_start)
            run_id = study_records.child_run(
                uri, self.experiment_id, self.parent_run_id, self.config.name, role=EVALUATION_ROLE, stage=stage,
                arm=arm, fingerprint=self.evaluation_fingerprint(key), params={"benchmarks": self.benchmarks},
                tags={"model_path": self.models[key], "start_model": self.models.get(start or "", "")})
            study_records.log_scores(uri, run_id, metrics)
            study_records.end_child_run(uri, run_id)

    def run(self) -> dict[str, Any]:
        arms = self.config.study.arms
        self.evaluate("base", self.config.model.path)
        if "sft_then_dpo" in arms:
            self.evaluate("sft", self.train("sft", self.config.model.path))
            self.collect(wait=False)  # what finished meanwhile is kept even if a later stage fails
        for arm in ARMS:
            if arm in arms:
                self.evaluate(arm, self.train(arm, self.models["sft" if arm == "sft_then_dpo" else "base"]))
                self.collect(wait=False)
        self.collect()
        if self.tracking:
            self.record_evaluations()
        kinds = [(entry["name"], entry["kind"]) for entry in self.benchmarks]
        return {"name": self.config.name, "arms": arms, "models": self.models, "scores": self.scores,
                "deltas": deltas(self.scores, self.relative_to_start),
                "table": study_table(self.scores, kinds, self.relative_to_start), "storage": self.layout.root}


def preflight(config: ExperimentConfig, layout: StorageLayout) -> None:
    """Bad config, data or benchmark data fail here: before Ray, a server, or any file is written."""
    from trainables.benchmarks.base import check_benchmark_data
    from trainables.data import load_prompt_answers
    from trainables.entrypoints import load_preference_data

    if config.model.lora is not None:
        raise ConfigError("model.lora: `dpo study` trains full weights (each stage hands a full model to the next); "
                          "remove model.lora")
    if not config.benchmarks:
        raise ConfigError("benchmarks: `dpo study` needs at least one benchmark entry (see configs/quickstart-study.yaml)")
    specs = {}
    for stage in study_stages(config):  # every stage resolves (e.g. its batch splits over the workers)
        experiment = stage_experiment(config, stage, config.model.path, layout, None)
        if stage_mode(config, stage) == "sweep":
            resolve_experiment(experiment)
        else:
            specs[stage] = stage_run(experiment, stage)
    base = resolve_run(config, reference_cache=layout.reference_cache)  # the data, as every stage reads it
    data = load_preference_data(base.model, base.data)
    if "sft" in specs:
        sft_data = specs["sft"].data
        load_prompt_answers(sft_data.train, split=sft_data.train_split, chat_template_tokenizer=data.tokenizer)
    check_benchmark_data(study_benchmarks(config), config.model.tokenizer_path or config.model.path,
                         config.model.trust_remote_code)
    logger.info("study inputs ok: %d training pairs, %d benchmarks", len(data.train), len(config.benchmarks))


def study_benchmarks(config: ExperimentConfig) -> list[dict[str, Any]]:
    """The benchmark entries as the benchmark runner takes them (plain dicts)."""
    return [entry.model_dump() for entry in config.benchmarks]


def run_study(config: ExperimentConfig, *, address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The whole `dpo study`; returns the results (scores, deltas, table, paths) and writes them to disk."""
    import ray

    from orchestrator.workflows.run_lock import release_driver_lock, take_driver_lock

    layout = study_layout(config)
    if resume and not layout.exists():
        raise ConfigError(f"--resume: no study named {config.name!r} under {config.storage_path} ({layout.root})")
    preflight(config, layout)
    from orchestrator.workflows.plan import refuse_unfit_trials

    refuse_unfit_trials(config)  # a trial whose GPU it cannot fit (dpo plan) is refused before Ray starts
    uri = None
    if config.tracking.enabled:
        from orchestrator.tracking.server import prepare_tracking_uri

        uri = prepare_tracking_uri(config.tracking.uri, layout.storage)
    study = Study(config, uri, address)
    started = time.monotonic()
    root = Path(layout.root)
    lock = take_driver_lock(None if layout.remote else root, "study")  # one driver per study name (run_lock.py)
    try:
        if study.tracking:
            study.experiment_id, study.parent_run_id = study_records.open_study_run(
                uri, study.tracking.experiment, config.name, config.model_dump())
        results = study.run()
        results["seconds"] = round(time.monotonic() - started, 1)
        if uri:
            results["mlflow"] = {"uri": uri, "parent_run_id": study.parent_run_id}
        root.mkdir(parents=True, exist_ok=True)
        (root / TABLE_FILE).write_text(results["table"] + "\n")
        (root / RESULTS_FILE).write_text(study_records.results_json(results))
        if uri:
            study_records.finish_study_run(uri, study.parent_run_id, {TABLE_FILE: results["table"] + "\n",
                                                                      RESULTS_FILE: study_records.results_json(results)})
    except BaseException as error:
        if uri and study.parent_run_id:
            study_records.finish_study_run(uri, study.parent_run_id, {}, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if study.started_ray:
            ray.shutdown()
        release_driver_lock(lock)
    return results


def print_results(results: dict[str, Any]) -> None:
    print(f"study {results['name']} ({', '.join(results['arms'])}) in {results['seconds']:.0f} s")
    print(results["table"])
    print(f"results: {results['storage']}/{RESULTS_FILE}")
    if results.get("mlflow"):
        from orchestrator.tracking.records import redact

        print(f"MLflow: {redact(results['mlflow']['uri'])} (study run {results['mlflow']['parent_run_id']})")
