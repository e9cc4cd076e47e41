"""`dpo study`: SFT-then-DPO versus DPO-only with downstream benchmark deltas, one resumable Ray pipeline.

    base model --SFT--> SFT model --DPO--> SFT+DPO      (arm sft_then_dpo; the DPO reference is the SFT model)
    base model --DPO--> DPO-only                        (arm dpo_only; the DPO reference is the base model)

Order of work: validate the config, the training data and every benchmark's data (before Ray or a
server starts) -> start or join Ray -> the study's MLflow parent run -> evaluate the base model (a Ray
task) -> the SFT stage (a Ray Train job) -> each arm's DPO (a Ray Train job with fixed values, or a
sweep of its own; see orchestrator/study_jobs.py) -> each new model is evaluated by a Ray task as soon
as it exists, while the next stage trains -> every evaluation is recorded as an MLflow run with its
deltas (orchestrator/study_records.py) -> the result table is printed and
logged on the parent run, and written with the raw results under `<storage_path>/<name>/`.

Resumable: each stage writes `<storage_path>/<name>/<stage>/model/` and then STAGE_COMPLETE.json
(stages: sft, sft_then_dpo, dpo_only), each evaluation `<storage_path>/<name>/evaluations/<model>.json`;
rerunning the command (or `--resume`) skips what is complete, and an interrupted training job continues
from its last checkpoint. A stage that was started with other settings is an error, not silently reused.
Run: `dpo study configs/quickstart-study.yaml [--set k=v ...] [--address auto] [--resume]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import config as cfg
from orchestrator import study_records as records
from orchestrator.study_config import arm_sections, sft_train_section
from orchestrator.study_records import START_OF, deltas, study_table

logger = logging.getLogger(__name__)

COMPLETE_FILE, STARTED_FILE = "STAGE_COMPLETE.json", "STAGE_STARTED.json"
RESULTS_FILE, TABLE_FILE = "study_results.json", "study_table.md"
STAGE_AND_ARM = {"base": ("base", records.SHARED_ARM), "sft": ("sft", "sft_then_dpo"),
                 "sft_then_dpo": ("dpo", "sft_then_dpo"), "dpo_only": ("dpo", "dpo_only")}


@dataclass(frozen=True)
class StudyPaths:
    root: Path  # <storage_path>/<name>
    train_jobs: Path  # Ray Train storage of the SFT and fixed-value DPO jobs
    reference_cache: Path
    evaluations: Path


def study_paths(config: cfg.ExperimentConfig) -> StudyPaths:
    if "://" in config.storage_path:
        raise cfg.ConfigError("storage_path: `dpo study` needs a local or shared filesystem path (the stages hand "
                              f"model folders to each other), not {config.storage_path}")
    root = Path(config.storage_path).expanduser().resolve() / config.name
    return StudyPaths(root, root / "train-jobs", Path(config.reference.cache_dir or root / "reference_cache"),
                      root / "evaluations")


def stage_experiment(config: cfg.ExperimentConfig, stage: str, start_model: str, paths: StudyPaths,
                     tracking: dict[str, Any] | None) -> cfg.ExperimentConfig:
    """The config one stage trains with: starts from (and, for DPO, is referenced to) start_model."""
    raw = config.model_dump()
    raw["model"]["path"] = start_model
    raw["reference"]["path"] = start_model
    raw["reference"]["cache_dir"] = str(paths.reference_cache)
    raw["output_dir"] = str(paths.root / stage / "outputs")
    if stage == "sft":
        raw["train"] = sft_train_section(config)
    else:
        raw.update(arm_sections(config, stage))
        raw["name"] = f"{config.name}-{stage}"  # its sweep (mode: sweep) lives at <root>/<name>-<arm>
        raw["storage_path"] = str(paths.root)
        raw["tracking"] = {"enabled": tracking is not None, "uri": tracking["uri"] if tracking else None,
                           "experiment": tracking["experiment"] if tracking else None}
    return cfg.ExperimentConfig.model_validate(raw)


RESULT_TRAIN_KEYS = ("learning_rate", "batch_size", "max_steps", "warmup_steps", "schedule", "weight_decay",
                     "max_grad_norm", "seed", "precision")  # what changes a trained model (not logging or eval cadence)
SFT_DATA_KEYS = ("sft_train", "sft_eval", "columns", "max_length", "max_prompt_length", "drop_invalid", "max_invalid_fraction")


def stage_fingerprint(experiment: cfg.ExperimentConfig, stage: str, mode: str) -> str:
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
            raise cfg.ConfigError(
                f"study stage {stage_dir.name} in {stage_dir} was run with other settings (fingerprint "
                f"{recorded.get('fingerprint')}, now {fingerprint}); give the study a new `name`, or delete "
                f"{stage_dir} (and the stages after it) to run it again")


class Study:
    """One run of the pipeline; holds the paths, the MLflow ids and the evaluations in flight."""

    def __init__(self, config: cfg.ExperimentConfig, tracking_uri: str | None, address: str | None = None):
        self.config, self.paths, self.address = config, study_paths(config), address
        self.started_ray = False  # Ray starts with the first stage or evaluation left to do
        self.experiment = config.tracking.experiment or config.name
        self.uri = tracking_uri
        self.experiment_id = self.parent_run_id = None
        self.benchmarks = [entry.model_dump() for entry in config.benchmarks]
        self.relative_to_start = {entry["name"] for entry in self.benchmarks  # measured against the start model
                                  if entry.get("against", entry.get("reference")) == "start"}
        self.models: dict[str, str] = {}  # model key -> model folder
        self.pending: dict[str, Any] = {}  # model key -> Ray ObjectRef of its scores
        self.scores: dict[str, dict[str, float]] = {}

    def ensure_ray(self) -> None:
        import ray

        from orchestrator.sweep import start_ray

        if not ray.is_initialized():
            start_ray(self.address, self.config)
            self.started_ray = True

    @property
    def tracking(self) -> dict[str, Any] | None:
        return {"uri": self.uri, "experiment": self.experiment} if self.uri else None

    def train(self, stage: str, start_model: str) -> str:
        """Run (or skip, when complete) one training stage; returns its model folder."""
        from orchestrator.study_jobs import copy_model, fit_training_job, run_arm_sweep

        experiment = stage_experiment(self.config, stage, start_model, self.paths, self.tracking)
        mode = "fixed" if stage == "sft" else getattr(self.config.study, stage).mode
        stage_dir, fingerprint = self.paths.root / stage, stage_fingerprint(experiment, stage, mode)
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
            if self.uri:
                records.adopt_sweep_runs(self.uri, self.experiment_id, self.parent_run_id, experiment.name, arm)
            extra = {"sweep_best": summary.get("best")}
        else:
            run_id = None
            if self.uri:
                run_id = records.child_run(self.uri, self.experiment_id, self.parent_run_id, self.config.name, role="train",
                                           stage=name, arm=arm, fingerprint=fingerprint, params=experiment.model_dump(),
                                           tags={"start_model": start_model})
            source = fit_training_job(name, experiment, name=stage, storage=str(self.paths.train_jobs),
                                      tracking={"uri": self.uri, "run_id": run_id} if run_id else None)
            if run_id:
                records.tracking.end_run(self.uri, run_id, "FINISHED")
            extra = {}
        model_dir = copy_model(source, stage_dir / "model")
        seconds = time.monotonic() - started
        marker = {"stage": stage, "model": model_dir, "source": source, "start_model": start_model, "mode": mode,
                  "fingerprint": fingerprint, "seconds": round(seconds, 1), **extra}
        (stage_dir / COMPLETE_FILE).write_text(json.dumps(marker, indent=1, default=str))
        logger.info("study stage %s done in %.0f s: %s", stage, seconds, model_dir)
        return model_dir

    def evaluation_fingerprint(self, key: str) -> str:
        stage_marker = _read_json(self.paths.root / key / COMPLETE_FILE) or {}
        content = [self.benchmarks, self.models[key], self.comparisons(key), stage_marker.get("fingerprint")]
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def comparisons(self, key: str) -> dict[str, str]:
        return {"start": self.models[START_OF.get(key, "base")], "base": self.models["base"]}

    def evaluate(self, key: str, model_dir: str) -> None:
        """Start the Ray task that scores one model (unless a matching result is on disk)."""
        import ray

        from trainables.benchmarks.base import evaluate_model

        self.models[key] = model_dir
        recorded = _read_json(self.paths.evaluations / f"{key}.json")
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
        self.paths.evaluations.mkdir(parents=True, exist_ok=True)
        for key, reference in list(self.pending.items()):
            if reference in done:
                self.scores[key] = ray.get(reference)
                record = {"model": self.models[key], "scores": self.scores[key], "fingerprint": self.evaluation_fingerprint(key)}
                (self.paths.evaluations / f"{key}.json").write_text(json.dumps(record, indent=1))
                del self.pending[key]

    def record_evaluations(self) -> None:
        """One MLflow run per evaluated model: bench/, bench_delta/ and bench_delta_vs_base/ metrics."""
        for key, scores in self.scores.items():
            stage, arm = STAGE_AND_ARM[key]
            start = START_OF.get(key)
            metrics = records.bench_metrics(scores, self.scores.get(start) if start else None,
                                            self.scores.get("base") if key != "base" else None, self.relative_to_start)
            run_id = records.child_run(self.uri, self.experiment_id, self.parent_run_id, self.config.name,
                                       role="evaluation", stage=stage, arm=arm, fingerprint=self.evaluation_fingerprint(key),
                                       params={"benchmarks": self.benchmarks},
                                       tags={"model_path": self.models[key], "start_model": self.models.get(start or "", "")})
            records.log_scores(self.uri, run_id, metrics)
            records.tracking.end_run(self.uri, run_id, "FINISHED")

    def run(self) -> dict[str, Any]:
        arms = self.config.study.arms
        self.evaluate("base", self.config.model.path)
        if "sft_then_dpo" in arms:
            self.evaluate("sft", self.train("sft", self.config.model.path))
            self.collect(wait=False)  # what finished meanwhile is kept even if a later stage fails
        for arm in ("sft_then_dpo", "dpo_only"):
            if arm in arms:
                self.evaluate(arm, self.train(arm, self.models["sft" if arm == "sft_then_dpo" else "base"]))
                self.collect(wait=False)
        self.collect()
        if self.uri:
            self.record_evaluations()
        kinds = [(entry["name"], entry["kind"]) for entry in self.benchmarks]
        return {"name": self.config.name, "arms": arms, "models": self.models, "scores": self.scores,
                "deltas": deltas(self.scores, self.relative_to_start),
                "table": study_table(self.scores, kinds, self.relative_to_start), "storage": str(self.paths.root)}


def preflight(config: cfg.ExperimentConfig) -> None:
    """Bad config, data or benchmark data fail here: before Ray, a server, or any file is written."""
    from trainables.benchmarks.base import check_benchmark_data
    from trainables.data import load_prompt_answers
    from trainables.entrypoints import load_preference_data

    if config.model.lora is not None:
        raise cfg.ConfigError("model.lora: `dpo study` trains full weights (each stage hands a full model to the next); "
                              "remove model.lora")
    if not config.benchmarks:
        raise cfg.ConfigError("benchmarks: `dpo study` needs at least one benchmark entry (see configs/quickstart-study.yaml)")
    model_args = cfg.model_args(config)
    data = load_preference_data(model_args, cfg.data_args(config))
    if "sft_then_dpo" in config.study.arms:
        sft_data = cfg.data_args(config, sft=True)
        load_prompt_answers(sft_data.train, split=sft_data.train_split, chat_template_tokenizer=data.tokenizer)
    check_benchmark_data([entry.model_dump() for entry in config.benchmarks],
                         config.model.tokenizer_path or config.model.path, config.model.trust_remote_code)
    logger.info("study inputs ok: %d training pairs, %d benchmarks", len(data.train), len(config.benchmarks))


def run_study(config: cfg.ExperimentConfig, *, address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The whole `dpo study`; returns the results (scores, deltas, table, paths) and writes them to disk."""
    import ray

    paths = study_paths(config)
    if resume and not paths.root.is_dir():
        raise cfg.ConfigError(f"--resume: no study named {config.name!r} under {config.storage_path} ({paths.root})")
    preflight(config)
    uri = None
    if config.tracking.enabled:
        from orchestrator.mlflow_server import prepare_tracking_uri

        uri = prepare_tracking_uri(config.tracking.uri, config.storage_path)
    study = Study(config, uri, address)
    started = time.monotonic()
    try:
        if uri:
            study.experiment_id, study.parent_run_id = records.open_study_run(uri, study.experiment, config.name, config.model_dump())
        results = study.run()
        results["seconds"] = round(time.monotonic() - started, 1)
        if uri:
            results["mlflow"] = {"uri": uri, "parent_run_id": study.parent_run_id}
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / TABLE_FILE).write_text(results["table"] + "\n")
        (paths.root / RESULTS_FILE).write_text(records.results_json(results))
        if uri:
            records.finish_study_run(uri, study.parent_run_id, {TABLE_FILE: results["table"] + "\n",
                                                                RESULTS_FILE: records.results_json(results)})
    except BaseException as error:
        if uri and study.parent_run_id:
            records.finish_study_run(uri, study.parent_run_id, {}, error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if study.started_ray:
            ray.shutdown()
    return results


def print_results(results: dict[str, Any]) -> None:
    print(f"study {results['name']} ({', '.join(results['arms'])}) in {results['seconds']:.0f} s")
    print(results["table"])
    print(f"results: {results['storage']}/{RESULTS_FILE}")
    if results.get("mlflow"):
        from orchestrator.tracking import redact

        print(f"MLflow: {redact(results['mlflow']['uri'])} (study run {results['mlflow']['parent_run_id']})")
