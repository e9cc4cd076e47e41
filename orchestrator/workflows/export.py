"""`dpo export`: a trial's best checkpoint as a standard Hugging Face model directory, verified, optionally registered.

Which checkpoint: the trial's folder is the `checkpoint_dir` tag of its MLflow run (Ray keeps its
checkpoints there as `checkpoint_<time>/`; `dpo train` output dirs hold `checkpoints/step-NNNNNN/`), else
the trial's folder of the storage layout under --storage-path (orchestrator/config/layout.py). Every
complete checkpoint (manifest.json present, hashes checked) is scored by the trial's value of the
selection metric at the checkpoint's step; the best wins, the later step on a tie, and the last one when
no checkpoint step has a score.

The directory written (built in a sibling staging folder, then renamed into place):
    config.json  generation_config.json  model.safetensors  tokenizer files  (save_pretrained layout)
    README.md         model card: beta, kl_weight, learning_rate, metrics, lineage, how to load it
    dpo_lineage.json  the same facts as JSON (sweep, trial, run id, checkpoint, data fingerprints, base model)
    adapter/          LoRA trials with `--adapter`: the unmerged adapter (the weights above are merged)
LoRA checkpoints (adapter_config.json) are merged into their base model with peft's merge_and_unload.
Before success is reported the directory is loaded with AutoModelForCausalLM and generates a few tokens.
`--register NAME` logs it with MLflow's transformers flavor as a LoggedModel of the trial's run (the
metrics at the exported checkpoint linked to it), creates a version of NAME in the MLflow Model Registry
and points the alias `--alias` (default `champion`) at it: `mlflow.transformers.load_model(
"models:/NAME@champion")` gives a text-generation pipeline. Run: `dpo export configs/quickstart.yaml --out DIR`; tested by
`python -m pytest tests/test_export.py -q`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from orchestrator.config.layout import StorageLayout, find_checkpoints, is_remote
from orchestrator.errors import ExportError
from orchestrator.tracking.records import package_versions, redact
from orchestrator.tracking.schema import (CHECKPOINT_DIR_TAG, DATA_TAG_PREFIX, EXPORT_DIR_TAG, EXPORT_STEP_TAG,
                                          EXPORTED_MODEL_ARTIFACT_FOLDER, GIT_COMMIT_TAG, REFERENCE_CACHE_KEY_TAG)
from trainables.checkpointing import STATE_FILE, is_complete, is_sharded_checkpoint, load_training_state
from trainables.sharded_checkpoint import load_sharded_state

logger = logging.getLogger(__name__)

LINEAGE_FILE = "dpo_lineage.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DEFAULT_PROMPT = "Hello"


@dataclass
class CheckpointChoice:
    path: Path  # the checkpoint folder (model/, training_state.pt, manifest.json)
    step: int
    score: float | None  # the metric at this step, when it was logged there
    reason: str


@dataclass
class ExportResult:
    directory: Path
    trial_id: str
    run_id: str
    checkpoint: CheckpointChoice
    lora: bool
    generated: str  # what the verification generated from the prompt
    lineage: dict[str, Any] = field(default_factory=dict)
    registered_version: "Registration | None" = None  # the version of NAME in the Model Registry, and its alias


def choose_checkpoint(trial_dir: Path, scores: pd.Series, metric: str, *, higher_is_better: bool = True) -> CheckpointChoice:
    """The best complete checkpoint by `scores` (metric values by step), else the last one (module docstring)."""
    if not trial_dir.is_dir():
        raise ExportError(f"the trial's checkpoint folder {trial_dir} does not exist (moved or deleted storage?)")
    candidates = [(step, path) for step, path in find_checkpoints(trial_dir) if is_complete(path)]
    if not candidates:
        raise ExportError(f"no complete checkpoint (manifest.json with matching hashes and model/) under {trial_dir}")
    scored = [(float(scores[step]), step, path) for step, path in candidates
              if step in scores.index and math.isfinite(float(scores[step]))]
    if not scored:
        step, path = candidates[-1]
        return CheckpointChoice(path, step, None, f"the last of {len(candidates)} checkpoints (no {metric} at their steps)")
    sign = 1.0 if higher_is_better else -1.0
    score, step, path = max(scored, key=lambda item: (sign * item[0], item[1]))
    kept = f"{len(candidates)} kept checkpoint{'s' if len(candidates) != 1 else ''}"
    return CheckpointChoice(path, step, score, f"best {metric} ({score:.4f}) of {kept}")


def is_lora_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / "model" / "adapter_config.json").is_file()


def _base_model_of(checkpoint: Path, fallback: str | None) -> str:
    """The model a LoRA checkpoint's adapter belongs to: the run's lineage, else the adapter config."""
    if (checkpoint / STATE_FILE).is_file():
        base = load_training_state(checkpoint).get("extra", {}).get("base_model")
        if base:
            return str(base)
    if fallback:
        return fallback
    adapter_config = json.loads((checkpoint / "model" / "adapter_config.json").read_text())
    if adapter_config.get("base_model_name_or_path"):
        return str(adapter_config["base_model_name_or_path"])
    raise ExportError(f"cannot tell which base model the LoRA adapter in {checkpoint} belongs to")


EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")  # `dpo export --dtype`; auto: the checkpoint's own


def check_export_dtype(dtype: str) -> str:
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {str(dtype)[:40]!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    return dtype


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _cast(model, dtype: str):
    return model if dtype == "auto" else model.to(torch_dtype(dtype))


def _consolidated(checkpoint: Path, base_model: str | None, lora: bool):
    """A sharded checkpoint's model in one process: built from its config (or, under LoRA, its base model with the
    adapter config), its saved tensors read from every rank's shards (dcp.load with no process group)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = checkpoint / "model"
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:
            raise ExportError(f"{checkpoint} holds a LoRA adapter; merging it needs peft: pip install -e '.[lora]'") from error
        base = AutoModelForCausalLM.from_pretrained(_base_model_of(checkpoint, base_model), dtype="auto", use_safetensors=True)
        model = get_peft_model(base, LoraConfig.from_pretrained(str(model_dir)))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    load_sharded_state(checkpoint, model)
    return model


def write_weights(checkpoint: Path, staging: Path, *, base_model: str | None, include_adapter: bool,
                  dtype: str = "auto") -> bool:
    """The HF model files of a checkpoint into staging (LoRA merged into its base); returns whether it was LoRA.

    Training checkpoints hold the fp32 master weights; `dtype` other than auto casts the floating-point weights
    on the way out (bfloat16 halves the files), and records it in the model's config.json."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    check_export_dtype(dtype)

    model_dir = checkpoint / "model"
    lora = is_lora_checkpoint(checkpoint)
    staging.mkdir(parents=True)
    if is_sharded_checkpoint(checkpoint):  # FSDP's torch.distributed.checkpoint shards, consolidated in this process
        model = _consolidated(checkpoint, base_model, lora)
        if lora and include_adapter:  # the unmerged adapter, as peft saves it
            model.save_pretrained(str(staging / "adapter"), safe_serialization=True)
            (staging / "adapter" / "README.md").unlink(missing_ok=True)
        _cast(model.merge_and_unload() if lora else model, dtype).save_pretrained(staging, safe_serialization=True)
        for item in model_dir.iterdir():  # tokenizer files (config.json is written by save_pretrained above)
            if item.is_file() and not (staging / item.name).exists() and item.name not in ADAPTER_FILES:
                shutil.copy2(item, staging / item.name)
    elif lora:
        try:
            from peft import PeftModel
        except ImportError as error:
            raise ExportError(f"{checkpoint} holds a LoRA adapter; merging it needs peft: pip install -e '.[lora]'") from error

        base_path = _base_model_of(checkpoint, base_model)
        logger.info("merging the LoRA adapter of %s into its base model %s", checkpoint, base_path)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto", use_safetensors=True)
        merged = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
        _cast(merged, dtype).save_pretrained(staging, safe_serialization=True)
        for item in model_dir.iterdir():  # the tokenizer files saved beside the adapter
            if item.is_file() and item.name not in ADAPTER_FILES and item.name != "README.md":
                shutil.copy2(item, staging / item.name)
        if include_adapter:
            (staging / "adapter").mkdir()
            for name in ADAPTER_FILES:
                if (model_dir / name).is_file():
                    shutil.copy2(model_dir / name, staging / "adapter" / name)
    elif dtype == "auto":  # save_pretrained output already: copied byte for byte, so the weights are exactly the trial's
        for item in model_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
    else:  # cast: the model saved anew in `dtype`, the tokenizer and other files copied
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), use_safetensors=True)
        model.save_pretrained(staging, safe_serialization=True)
        for item in model_dir.iterdir():
            if item.is_file() and not (staging / item.name).exists() and not item.name.endswith(".safetensors") \
                    and item.name != "model.safetensors.index.json":
                shutil.copy2(item, staging / item.name)
    if not (staging / "generation_config.json").is_file():
        from transformers import AutoConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(staging)).save_pretrained(staging)
    return lora


def verify_export(directory: Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 8) -> str:
    """Load the directory with AutoModelForCausalLM + AutoTokenizer and greedily generate; returns the new text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", use_safetensors=True).eval()
    except (OSError, ValueError) as error:
        raise ExportError(f"the exported directory {directory} does not load with AutoModelForCausalLM: {error}") from error
    starts_with_bos = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)  # as the engine tokenises
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not starts_with_bos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(**inputs).logits  # (1, seq, vocab)
        if not torch.isfinite(logits).all():
            raise ExportError(f"the exported model in {directory} produces non-finite logits")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    if len(new_tokens) == 0:
        raise ExportError(f"the exported model in {directory} generated no token")
    return tokenizer.decode(new_tokens, skip_special_tokens=False)


def _metric_table(metrics: dict[str, float]) -> list[str]:
    rows = [f"| `{key}` | {value:.4g} |" for key, value in sorted(metrics.items())
            if key.startswith(("eval/", "bench/", "bench_delta/")) and math.isfinite(value)]
    return ["| metric | value |", "|---|---|"] + rows if rows else ["(no eval metrics logged at this step)"]


def model_card(lineage: dict[str, Any]) -> str:
    """README.md of the exported directory: front matter, hyperparameters, metrics, lineage, usage."""
    hp = lineage["hyperparameters"]
    base = lineage.get("base_model") or "unknown"
    lines = ["---", "library_name: transformers", f"base_model: {json.dumps(base)}", "tags:", "- dpo",
             "- dpo-orchestrator", "---", "",
             f"# {lineage['sweep']} / trial {lineage['trial_id']} (DPO)", "",
             "Aligned with Direct Preference Optimization (Rafailov et al., 2023, arXiv 2305.18290) by dpo-orchestrator.",
             "", "## Hyperparameters", "", "| beta | kl_weight | learning_rate | loss | steps trained |", "|---|---|---|---|---|",
             f"| {hp['beta']:g} | {hp['kl_weight']:g} | {hp['learning_rate']:g} | {hp.get('loss') or 'sigmoid'} | "
             f"{lineage.get('steps_trained', '')} |", "",
             f"## Metrics at the exported checkpoint (step {lineage['checkpoint']['step']})", ""]
    lines += _metric_table(lineage["metrics_at_checkpoint"])
    if lineage["checkpoint"]["step"] != lineage.get("steps_trained"):
        lines += ["", f"The trial's final metrics (step {lineage.get('steps_trained')}; its last checkpoint scored "
                  "lower):", ""] + _metric_table(lineage["final_metrics"])
    data = lineage.get("data", {})
    lines += ["", "## Lineage", "",
              f"- sweep `{lineage['sweep']}`, trial `{lineage['trial_id']}`, MLflow run `{lineage['run_id']}` "
              f"(experiment `{lineage['experiment_id']}`, tracking URI `{lineage['tracking_uri']}`)",
              f"- checkpoint `{lineage['checkpoint']['path']}` (step {lineage['checkpoint']['step']}): "
              f"{lineage['checkpoint']['reason']}",
              f"- base model `{base}`" + (" (LoRA adapter merged)" if lineage["lora"] else ""),
              f"- reference model `{lineage.get('reference_model') or base}`, reference-cache key "
              f"`{lineage.get('reference_cache_key') or 'n/a'}`"]
    lines += [f"- data `{key}`: `{value}`" for key, value in sorted(data.items())]
    if lineage.get("git_commit"):
        lines.append(f"- code: git commit `{lineage['git_commit']}`")
    if lineage.get("selection_reason"):
        lines.append(f"- why this trial: {lineage['selection_reason']}")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(lineage['export_dir'])})",
              f"model = AutoModelForCausalLM.from_pretrained({json.dumps(lineage['export_dir'])})",
              "```", ""]
    return "\n".join(lines)


def prepare_output(out: Path) -> None:
    """An empty, missing or previously exported folder is fine; anything else is refused (never overwritten)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / LINEAGE_FILE).is_file())):
        raise ExportError(f"--out {out} exists and is not an earlier `dpo export` (no {LINEAGE_FILE}); "
                          "choose an empty or new folder")


def write_export(checkpoint: CheckpointChoice, out: Path, lineage: dict[str, Any], *, include_adapter: bool,
                 prompt: str, dtype: str = "auto") -> tuple[bool, str]:
    """Staging folder -> weights, card, lineage -> verification -> renamed to `out`; returns (lora, generated)."""
    out = out.expanduser().resolve()
    prepare_output(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        lora = write_weights(checkpoint.path, staging, base_model=lineage.get("base_model"), include_adapter=include_adapter,
                             dtype=dtype)
        lineage["lora"] = lora
        lineage["dtype"] = dtype
        (staging / "README.md").write_text(model_card(lineage))
        (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, default=str))
        generated = verify_export(staging, prompt)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return lora, generated


DEFAULT_ALIAS = "champion"
QUIET_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
FLUENT_ENVIRONMENT = (QUIET_URL_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # what fluent_uris puts back
MODEL_REQUIREMENTS = ("transformers", "torch", "tokenizers", "safetensors")  # what loading the MLflow model needs


@dataclass
class Registration:
    """What `--register` created: a LoggedModel of the trial's run and a version of NAME with an alias."""

    name: str
    version: str
    alias: str
    model_id: str
    model_uri: str  # models:/<model_id>

    def __str__(self) -> str:
        return f"{self.name}/{self.version} (alias @{self.alias}: models:/{self.name}@{self.alias})"


@contextlib.contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """mlflow's global tracking and registry URIs set to `uri` for a fluent call (log_model needs an active
    run), then put back exactly as they were: unset stays unset (mlflow's module state; no public getter
    tells "unset" from "the default")."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    tracking_state, registry_state = _tracking_service.utils, _model_registry.utils
    saved = getattr(tracking_state, "_tracking_uri", None), getattr(registry_state, "_registry_uri", None)
    # mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI (and the registry's variable) into os.environ:
    # left there, every later sweep of this process would log into this server instead of its own.
    saved_environment = {name: os.environ.get(name) for name in FLUENT_ENVIRONMENT}
    os.environ[QUIET_URL_ENV] = "true"  # no "View run ... at" lines when the reopened run ends
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_state._tracking_uri, registry_state._registry_uri = saved
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def register_export(uri: str, run_id: str, directory: Path, model_name: str, *, alias: str = DEFAULT_ALIAS,
                    metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, Any] | None = None,
                    prompt: str | None = None) -> Registration:
    """Log `directory` with MLflow's transformers flavor as a LoggedModel of the trial's run (its params and
    the metrics at the exported checkpoint linked to it), register it as a new version of `model_name` and
    point `alias` at that version, so that `mlflow.transformers.load_model("models:/NAME@ALIAS")` loads it.

    The trial's run is reopened for the upload and then given back its status and end time.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    # A pipeline object, not the directory's path: MLflow 3.17 cannot read transformers 5's task table from a
    # local checkpoint path; and the requirements are named, since inferring them imports torchvision.
    generator = pipeline("text-generation", tokenizer=AutoTokenizer.from_pretrained(directory),
                         model=AutoModelForCausalLM.from_pretrained(directory, dtype="auto", use_safetensors=True))
    requirements = [f"{package}=={version}" for package, version in package_versions(MODEL_REQUIREMENTS).items()
                    if package != "python"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(run_id)
    with fluent_uris(uri):
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.transformers.log_model(
                    transformers_model=generator, name=EXPORTED_MODEL_ARTIFACT_FOLDER, task="text-generation",
                    pip_requirements=requirements, input_example=[prompt] if prompt else None,
                    params={key: str(value) for key, value in (params or {}).items()}, model_type="dpo", step=step,
                    tags={EXPORT_DIR_TAG: str(directory)})
                finite = {key: value for key, value in (metrics or {}).items() if math.isfinite(value)}
                if finite:  # the model view ranks LoggedModels by these
                    mlflow.log_metrics(finite, step=step, run_id=run_id, model_id=info.model_id)
        finally:
            if run.info.status in ("FINISHED", "FAILED", "KILLED"):
                client.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)
    try:
        client.create_registered_model(model_name, description="DPO models exported by dpo-orchestrator")
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    version = client.create_model_version(model_name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                          description=f"exported from {directory}")
    client.set_registered_model_alias(model_name, alias, version.version)
    return Registration(model_name, str(version.version), alias, info.model_id, info.model_uri)


def _trial_dir(row: dict[str, Any], sweep_name: str, storage_path: str | None) -> Path:
    """The trial's checkpoint folder: its run's checkpoint_dir tag, else the trial's folder in the storage
    layout of storage_path (also when the tagged folder is gone but that one exists: storage moved or
    mounted elsewhere)."""
    tagged = str(row.get("checkpoint_dir") or "")  # the trial table's column of the tag
    under_storage = (Path(StorageLayout.of(storage_path, sweep_name).trial_dir(str(row["trial_id"])))
                     if storage_path and not is_remote(storage_path) else None)
    if tagged and not is_remote(tagged):  # the tag, unless the storage moved and --storage-path points at it
        return under_storage if under_storage and under_storage.is_dir() and not Path(tagged).is_dir() else Path(tagged)
    if under_storage:
        return under_storage
    where = (f"its checkpoints are in object storage ({tagged})" if tagged
             else f"its MLflow run has no {CHECKPOINT_DIR_TAG} tag")
    raise ExportError(f"trial {row['trial_id']}: {where}; export reads a filesystem: pass --storage-path with the "
                      "sweep's storage (a local copy or mount) holding <name>-trials/<trial_id>")


def export_trial(sweep, out: str | Path, *, trial_id: str | None = None, rule=None, include_adapter: bool = False,
                 register: str | None = None, prompt: str = DEFAULT_PROMPT, storage_path: str | None = None,
                 alias: str = DEFAULT_ALIAS, dtype: str = "auto") -> ExportResult:
    """Export trial `trial_id` of a loaded sweep (analysis.runs.SweepRuns), or the one the selection rule picks."""
    from mlflow.tracking import MlflowClient

    from analysis.runs import lower_is_better
    from analysis.selection import SelectionRule, select_trial

    check_export_dtype(dtype)  # before anything is read
    selection = select_trial(sweep.trials, rule or SelectionRule())
    if trial_id is None:
        if selection.chosen is None:
            raise ExportError(f"sweep {sweep.name}: {selection.reason} Or pass --trial ID to export a trial anyway.")
        trial_id, why = str(selection.chosen["trial_id"]), selection.reason
    else:
        why = f"chosen by hand (--trial {trial_id})"
    run_id = sweep.run_id_of(trial_id)  # raises naming the known trials
    row = selection.table[selection.table["trial_id"] == trial_id].iloc[0].to_dict()
    curves = sweep.histories.get(run_id, {})
    checkpoint = choose_checkpoint(_trial_dir(row, sweep.name, storage_path), sweep.history(trial_id, selection.metric),
                                   selection.metric, higher_is_better=not lower_is_better(selection.metric))
    client = MlflowClient(tracking_uri=sweep.uri)
    params = {key: value for key, value in client.get_run(run_id).data.params.items() if value not in ("None", "null", "")}
    out = Path(out).expanduser().resolve()
    lineage: dict[str, Any] = {
        "sweep": sweep.name, "trial_id": trial_id, "run_id": run_id, "experiment_id": sweep.experiment_id,
        "parent_run_id": sweep.parent_run_id, "tracking_uri": str(redact(sweep.uri)),
        "hyperparameters": {"beta": float(row["beta"]), "kl_weight": float(row["kl_weight"]),
                            "learning_rate": float(row["learning_rate"]), "loss": params.get("dpo.loss"),
                            "batch_size": params.get("train.batch_size")},
        "steps_trained": int(row.get("steps") or 0),
        "checkpoint": {"path": str(checkpoint.path), "step": checkpoint.step, "score": checkpoint.score,
                       "metric": selection.metric, "reason": checkpoint.reason},
        "metrics_at_checkpoint": {key: float(curve[checkpoint.step]) for key, curve in curves.items()
                                  if checkpoint.step in curve.index},
        "final_metrics": {key: float(curve.iloc[-1]) for key, curve in curves.items() if not curve.empty},
        "base_model": params.get("model.path"), "reference_model": params.get("reference.path") or params.get("model.path"),
        "reference_cache_key": sweep.parent_tags.get(REFERENCE_CACHE_KEY_TAG),
        "data": {key: value for key, value in sweep.parent_tags.items() if key.startswith(DATA_TAG_PREFIX)},
        "git_commit": sweep.parent_tags.get(GIT_COMMIT_TAG), "selection_reason": why, "verification_prompt": prompt,
    }
    lineage["export_dir"] = str(out)
    lora, generated = write_export(checkpoint, out, lineage, include_adapter=include_adapter, prompt=prompt, dtype=dtype)
    client.set_tag(run_id, EXPORT_DIR_TAG, str(out))
    client.set_tag(run_id, EXPORT_STEP_TAG, str(checkpoint.step))
    registered = register_export(sweep.uri, run_id, out, register, alias=alias,
                                 metrics=lineage["metrics_at_checkpoint"], step=checkpoint.step,
                                 params=lineage["hyperparameters"], prompt=prompt) if register else None
    return ExportResult(directory=out, trial_id=trial_id, run_id=run_id, checkpoint=checkpoint, lora=lora,
                        generated=generated, lineage=lineage, registered_version=registered)
