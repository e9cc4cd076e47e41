"""`dpo export`: checkpoint choice, the Hugging Face directory, LoRA merging, verification, the registry.

Fast, unmarked tests cover which checkpoint is chosen (both on-disk layouts) and the refusal to overwrite
a folder that is not an earlier export. The `mlflow` + `integration` tests train tiny models for 6 steps
in this process (the engine `dpo train` runs, writing real checkpoints into a trial folder), record them
in a real `mlflow server` on 127.0.0.1 the way `dpo sweep` does (the run's checkpoint_dir tag and its
real metric curves), then run `dpo export`: the exported directory's logits must equal the trial
checkpoint's (full weights: exactly; LoRA: merged adapter within 1e-5), its model card and lineage must
name beta, kl_weight, learning_rate, the sweep, the trial, the data fingerprint and the base model, and
`--register` must create a Model Registry version.
Run: `python -m pytest tests/test_export.py -q` (about 40 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from orchestrator.config.layout import find_checkpoints
from orchestrator.errors import ExportError
from orchestrator.workflows.export import LINEAGE_FILE, choose_checkpoint, fluent_uris, prepare_output
from tests.test_analysis import log_sweep, mlflow_server  # noqa: F401 - the shared real server fixture
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl


def fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder as the engine writes it, without weights (an empty manifest is complete)."""
    (folder / "model").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    return folder


# ---- without a server ------------------------------------------------------------------------------

def test_the_checkpoint_with_the_best_score_is_chosen_else_the_last(tmp_path):
    ray_layout = tmp_path / "ray-trial"  # Ray Train keeps checkpoint_<time>/ folders in the trial folder
    fake_checkpoint(ray_layout / "checkpoint_2026-11-24_10-00-00.000001", 3)
    fake_checkpoint(ray_layout / "checkpoint_2026-11-24_10-00-05.000001", 6)
    (ray_layout / ".staging-step-000009-1").mkdir()  # never a checkpoint
    engine_layout = tmp_path / "engine-run"  # `dpo train`: checkpoints/step-NNNNNN/
    fake_checkpoint(engine_layout / "checkpoints" / "step-000003", 3)
    fake_checkpoint(engine_layout / "checkpoints" / "step-000006", 6)
    for trial_dir in (ray_layout, engine_layout):
        assert [step for step, _ in find_checkpoints(trial_dir)] == [3, 6]
        best = choose_checkpoint(trial_dir, pd.Series({3: 0.9, 6: 0.8}), "eval/preference_accuracy")
        assert best.step == 3 and best.score == 0.9 and "best eval/preference_accuracy" in best.reason
        assert choose_checkpoint(trial_dir, pd.Series({3: 0.8, 6: 0.8}), "m").step == 6  # a tie: the later one
        last = choose_checkpoint(trial_dir, pd.Series(dtype=float), "eval/preference_accuracy")
        assert last.step == 6 and last.score is None and "the last of 2" in last.reason
    assert choose_checkpoint(ray_layout, pd.Series({3: 0.5, 6: 0.7}), "eval/kl", higher_is_better=False).step == 3
    with pytest.raises(ExportError, match="does not exist"):
        choose_checkpoint(tmp_path / "gone", pd.Series(dtype=float), "m")
    with pytest.raises(ExportError, match="no complete checkpoint"):
        choose_checkpoint(tmp_path / "ray-trial" / ".staging-step-000009-1", pd.Series(dtype=float), "m")


def test_export_never_overwrites_a_folder_that_is_not_an_earlier_export(tmp_path):
    prepare_output(tmp_path / "new")  # missing: fine
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / LINEAGE_FILE).write_text("{}")
    prepare_output(tmp_path / "earlier")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not an earlier `dpo export`"):
        prepare_output(tmp_path / "precious")


def test_export_dtype_casts_the_fp32_master_weights_and_auto_copies_them_exactly(tmp_path):
    """Checkpoints keep fp32 master weights; `dpo export --dtype bfloat16` writes them cast to bf16 (and says so in
    config.json), `auto` copies the checkpoint's files byte for byte, and an unknown dtype is refused before writing."""
    from safetensors.torch import load_file

    from orchestrator.workflows.export import write_weights

    checkpoint = tmp_path / "step-000004"
    build_model_dir(checkpoint / "model")
    master = load_file(checkpoint / "model" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in master.values())

    write_weights(checkpoint, tmp_path / "bf16", base_model=None, include_adapter=False, dtype="bfloat16")
    cast = load_file(tmp_path / "bf16" / "model.safetensors")
    assert set(cast) <= set(master) and cast
    for name, tensor in cast.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, master[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()  # the tokenizer travels with the weights

    write_weights(checkpoint, tmp_path / "auto", base_model=None, include_adapter=False, dtype="auto")
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (checkpoint / "model" / "model.safetensors").read_bytes()

    with pytest.raises(ExportError, match="--dtype 'int8'"):
        write_weights(checkpoint, tmp_path / "bad", base_model=None, include_adapter=False, dtype="int8")
    assert not (tmp_path / "bad").exists()


# ---- real checkpoints, real MLflow ------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export-world")
    return {"root": root, "model": str(build_model_dir(root / "model", "llama")),
            "train": str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 48, seed=1))),
            "eval": str(write_jsonl(root / "eval.jsonl", pair_rows("explicit", 16, seed=2)))}


def train_trial(world: dict, trial_dir: Path, *, lora: bool) -> dict[str, dict[int, float]]:
    """6 DPO steps in this process, checkpoints at steps 3 and 6 in trial_dir; returns the metric curves."""
    from trainables.entrypoints import run_dpo

    spec = engine_args(world["model"], world["train"], world["eval"], reference_cache=world["root"] / "cache",
                       output_dir=trial_dir, data__max_length=48, dpo__beta=0.2, train__device="cpu",
                       train__learning_rate=5e-3, train__batch_size=8, train__micro_batch_size=8, train__max_steps=6,
                       train__warmup_steps=0, train__schedule="cosine", train__weight_decay=0.0,
                       train__max_grad_norm=1.0, train__eval_every=3, train__checkpoint_every=3,
                       train__keep_checkpoints=None, train__log_every=1, train__seed=0,
                       **({"model__lora": {"r": 4, "alpha": 8.0}} if lora else {}))
    reports: list[dict] = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, lambda metrics, _: reports.append(metrics))
    curves: dict[str, dict[int, float]] = {}
    for report in reports:
        for key, value in report.items():
            if key != "step" and isinstance(value, float):
                curves.setdefault(key, {})[int(report["step"])] = value
    return curves


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits  # (batch, seq, vocab)


@pytest.mark.mlflow
@pytest.mark.integration
def test_export_round_trips_the_chosen_trials_best_checkpoint_and_registers_it(world, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from orchestrator.cli.main import main

    url, storage = mlflow_server["url"], tmp_path / "runs"
    trial_dir = storage / "tiny-full-trials" / "t-full"
    curves = train_trial(world, trial_dir, lora=False)
    log_sweep(url, "tiny-full", [{"trial_id": "t-full", "beta": 0.2, "curves": curves, "model_path": world["model"],
                                  "checkpoint_dir": str(trial_dir)}])
    out = tmp_path / "exported"
    environment = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}

    code = main(["export", "tiny-full", "--tracking-uri", url, "--out", str(out), "--register", "tiny-dpo",
                 "--prompt", "question the cat"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed + captured.err
    # registering used MLflow's fluent API; the process's MLflow environment is as it was (a leaked
    # MLFLOW_TRACKING_URI sent a later sweep of the same process into this server)
    assert {name: os.environ.get(name) for name in environment} == environment
    assert "exported trial t-full" in printed and "registered in the MLflow Model Registry as tiny-dpo/1" in printed
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            LINEAGE_FILE} <= {path.name for path in out.iterdir()}

    lineage = json.loads((out / LINEAGE_FILE).read_text())
    accuracy = curves["eval/preference_accuracy"]
    expected_step = max((accuracy[3], 3), (accuracy[6], 6))[1]  # best accuracy, the later step on a tie
    assert lineage["checkpoint"]["step"] == expected_step
    checkpoint_model = Path(lineage["checkpoint"]["path"]) / "model"
    ids = torch.randint(4, 20, (2, 12))
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits_of(exported, ids), logits_of(AutoModelForCausalLM.from_pretrained(checkpoint_model), ids))

    card = (out / "README.md").read_text()
    for fact in ("| 0.2 | 0 | 0.001 |", "tiny-full", "t-full", "a" * 64, world["model"], "eval/preference_accuracy"):
        assert fact in card, fact
    assert lineage["hyperparameters"]["beta"] == 0.2 and lineage["data"]["data.train.sha256"] == "a" * 64
    assert lineage["base_model"] == world["model"] and not lineage["lora"]

    client = MlflowClient(tracking_uri=url)
    [version] = client.search_model_versions("name='tiny-dpo'")
    assert version.run_id == lineage["run_id"]
    trial_run = client.get_run(lineage["run_id"])
    assert trial_run.data.tags["export.dir"] == str(out.resolve())
    assert trial_run.info.status == "FINISHED"  # reopened for the upload, given back its status
    assert client.get_model_version_by_alias("tiny-dpo", "champion").version == version.version
    assert "models:/tiny-dpo@champion" in printed
    check_mlflow_model(url, "tiny-dpo", version, lineage, out)

    assert main(["export", "tiny-full", "--tracking-uri", url, "--out", str(out), "--trial", "t-missing"]) == 2
    error = capsys.readouterr().err
    assert "no trial 't-missing' in sweep 'tiny-full'" in error and "its trials: t-full" in error


def check_mlflow_model(url: str, name: str, version, lineage: dict, out: Path) -> None:
    """The registered version is a LoggedModel of the trial's run (metrics linked) that MLflow's transformers
    flavor loads from the alias as a pipeline, with the exported weights, and that generates."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    client = MlflowClient(tracking_uri=url)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == lineage["run_id"]
    linked = {metric.key: metric.value for metric in logged.metrics or []}
    assert linked["eval/preference_accuracy"] == pytest.approx(lineage["metrics_at_checkpoint"]["eval/preference_accuracy"])
    environment = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    with fluent_uris(url):
        pipeline = mlflow.transformers.load_model(f"models:/{name}@champion")
    # put back as it was: a leaked MLFLOW_TRACKING_URI would send every later sweep of this process there
    assert {name: os.environ.get(name) for name in environment} == environment
    ids = torch.randint(4, 20, (1, 10))
    assert torch.equal(logits_of(pipeline.model, ids), logits_of(AutoModelForCausalLM.from_pretrained(out), ids))
    generated = pipeline("question the cat", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert generated.startswith("question the cat") and len(generated) > len("question the cat")


@pytest.mark.mlflow
@pytest.mark.integration
def test_a_lora_trial_exports_merged_weights_and_its_adapter(world, mlflow_server, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestrator.cli.main import main

    url, storage = mlflow_server["url"], tmp_path / "runs"
    trial_dir = storage / "tiny-lora-trials" / "t-lora"
    curves = train_trial(world, trial_dir, lora=True)
    log_sweep(url, "tiny-lora", [{"trial_id": "t-lora", "beta": 0.2, "curves": curves, "model_path": world["model"],
                                  "checkpoint_dir": str(trial_dir)}])
    out = tmp_path / "merged"

    assert main(["export", "tiny-lora", "--tracking-uri", url, "--out", str(out), "--adapter"]) == 0, capsys.readouterr()
    assert "LoRA merged" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()  # the top level is a plain model, no adapter to resolve

    lineage = json.loads((out / LINEAGE_FILE).read_text())
    assert lineage["lora"] and "(LoRA adapter merged)" in (out / "README.md").read_text()
    adapter_dir = Path(lineage["checkpoint"]["path"]) / "model"
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model"]), str(adapter_dir))
    base = AutoModelForCausalLM.from_pretrained(world["model"])
    ids = torch.randint(4, 20, (2, 12))
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out), ids)
    assert torch.allclose(merged, logits_of(with_adapter, ids), atol=1e-5)
    assert not torch.allclose(merged, logits_of(base, ids), atol=1e-4)  # the adapter really changed the model
