"""`dpo plan`: the memory plan against measured CPU peaks, a Llama-2-7B-shaped verdict, and bad input.

- Measured: one DPO-like optimizer step (2 micro-batches of 2 pairs x 128 tokens, chunked log-prob head,
  fused AdamW; bench/plan_vs_measured.py, which prints the full table) on a Llama-, a GPT-2- and a
  Qwen2-shaped random model; the CPU allocator's peak, from torch's memory profiler, is within 25% of the
  plan (fp32, gradient checkpointing and bf16 autocast each covered once). The activations the decoder
  keeps for backward, counted with saved_tensors_hooks, are within 10% of the per-layer formula.
- A Llama-2-7B-shaped config.json (nothing else; written here): full fine-tuning with DDP does not fit
  one 80 GiB GPU; FSDP over 8 x 80 GiB with gradient checkpointing fits. Assumed: bf16 compute
  (train.precision auto on a GPU) with fp32 master weights and AdamW, micro-batch 2 pairs (4 rows) x 2048
  tokens, precomputed reference.
- Exact parameter counts (tied embeddings once), LoRA adapter counts against peft, FSDP division, the
  JSON object, and a model.path without config.json or of an unknown type -> ConfigError naming it.
- Checkpoint and communication (`-k scale`, trainables/scale_plan.py), by hand arithmetic on the 7B shape:
  the sharded checkpoint's 12 bytes per weight and write time, the all-gathers per micro-batch and one
  reduce-scatter per step, FSDP over two nodes planned as the HSDP the engine builds (1/8 shards, only the
  replica all-reduce between nodes), DDP's and LoRA's rank-0 checkpoints. tests/test_sharded_resume.py checks
  the checkpoint bytes against a real sharded checkpoint.
Run: `python -m pytest tests/test_plan.py -q` (33 to 50 s on 2 shared CPU cores, about 28 s of CPU time:
imports, the profiler's start and the measured steps).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.workflows.plan import (
    GIB, add_plan_arguments, format_report, plan_command, plan_config, training_setup,
)
from trainables.memory_plan import (
    TrainingSetup, activation_bytes, model_shape_from_config, plan_memory, read_model_shape,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import plan_vs_measured  # noqa: E402

LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
TEST_VOCAB = 8000  # the measured steps use a small vocabulary to stay fast; the bench uses the real ones


def write_experiment(root: Path, model_dir: Path, **sections) -> Path:
    """An experiment YAML over `model_dir` (just a config.json is enough) and a one-pair data file."""
    import yaml

    data = root / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    raw = {"name": "plan", "model": {"path": str(model_dir)}, "data": {"train": str(data)}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory) -> Path:
    """A Llama-2-7B-shaped model directory holding only config.json, and an experiment over it."""
    root = tmp_path_factory.mktemp("llama-7b")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(LLAMA_2_7B))
    return write_experiment(root, root / "model", data={"max_length": 2048},
                            train={"batch_size": 64, "micro_batch_size": 2})


def plan_json(config: Path, *overrides: str, gpu: str = "80") -> dict:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args([str(config), "--gpu-memory", gpu, "--json", *[f"--set={o}" for o in overrides]])
    from io import StringIO
    from contextlib import redirect_stdout

    out = StringIO()
    with redirect_stdout(out):
        assert plan_command(args) == 0
    return json.loads(out.getvalue())


# ---- measured peaks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,checkpointing,bf16", [("llama", False, False), ("gpt2", True, False),
                                                      ("qwen2", False, True)])
def test_plan_is_within_25_percent_of_the_measured_cpu_peak(shape, checkpointing, bf16):
    configs = plan_vs_measured.shape_configs(vocab_size=TEST_VOCAB)
    settings = plan_vs_measured.StepSettings(checkpointing=checkpointing, bf16=bf16)
    measured = plan_vs_measured.measure(shape, configs[shape], settings)
    # the exact parts are exact: the weights and AdamW's state the plan counts are the model's own
    assert measured.plan.parts["weights"] == measured.weights_bytes * (2 if bf16 else 4) // 4
    assert measured.plan.parts["optimizer"] == measured.optimizer_bytes
    assert measured.plan.parts["gradients"] == measured.gradient_bytes
    assert 0.75 <= measured.ratio <= 1.25, (
        f"{shape}: planned {measured.planned_bytes / 2**20:.1f} MiB, measured {measured.peak_bytes / 2**20:.1f} MiB")


@pytest.fixture(scope="module")
def small_models() -> dict:
    """The three shapes as random models (sdpa, dropout off), built once for the tests that only run forwards."""
    return {name: (config, plan_vs_measured.build_model(config, checkpointing=False))
            for name, config in plan_vs_measured.shape_configs(vocab_size=TEST_VOCAB).items()}


@pytest.mark.parametrize("shape", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("bf16", [False, True])
def test_saved_activations_match_the_per_layer_formula(small_models, shape, bf16):
    """Bytes the decoder keeps for backward (no weights, no head) against the plan's activations part."""
    config, model = small_models[shape]
    settings = plan_vs_measured.StepSettings(bf16=bf16)
    batch = plan_vs_measured.make_batch(TEST_VOCAB, settings, seed=0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    casts = sum(p.numel() * 2 for p in model.base_model.parameters() if p.ndim == 2) if bf16 else 0  # autocast copies
    casts -= model.get_input_embeddings().weight.numel() * 2 if bf16 else 0  # an embedding lookup casts nothing
    measured = sum(size for pointer, size in kept.items() if pointer not in weights) - casts
    planned = activation_bytes(model_shape_from_config(config), settings.setup(), checkpointing=False)
    assert abs(planned / measured - 1) <= 0.10, f"planned {planned}, measured {measured}"


# ---- Llama-2-7B-shaped verdicts --------------------------------------------------------------------

def test_llama_2_7b_full_fine_tuning_does_not_fit_one_80_gib_gpu_with_ddp(llama_7b):
    shape = read_model_shape(str(llama_7b.parent / "model"))
    assert shape.parameters == 6_738_415_616  # Llama-2-7B's published count
    single = plan_json(llama_7b)
    assert single["fits"] is False and single["per_gpu_bytes"] > 80 * GIB
    assert single["setup"]["micro_batch_pairs"] == 2 and single["setup"]["seq_len"] == 2048
    assert single["training_bytes_with_checkpointing"] > 80 * GIB  # checkpointing alone is not enough
    ddp = plan_json(llama_7b, "resources.num_workers=8", "resources.strategy=ddp")
    assert ddp["setup"]["strategy"] == "ddp" and ddp["fits"] is False
    assert ddp["parts"]["ddp_buckets"] == ddp["parts"]["gradients"]  # a full replica and its buckets per worker
    # 16 bytes per weight before any activation: bf16 copy 2 + fp32 master 4 + fp32 gradient 4 + AdamW 8 = 18
    static = sum(single["parts"][p] for p in ("weights", "master_copy", "gradients", "optimizer"))
    assert static == 18 * shape.parameters


def test_llama_2_7b_fits_8_x_80_gib_with_fsdp_and_checkpointing(llama_7b):
    config = load_config(llama_7b, ["resources.num_workers=8", "resources.strategy=fsdp"])
    setup = replace(training_setup(config), gradient_checkpointing=True)
    shape = read_model_shape(config.model.path)
    plan = plan_memory(shape, setup)
    assert plan.total < 0.9 * 80 * GIB
    assert plan.parts["optimizer"] == 8 * shape.parameters // 8  # sharded over the 8 workers
    assert plan.parts["gradients"] >= 4 * shape.parameters // 8
    fsdp = plan_json(llama_7b, "resources.num_workers=8", "resources.strategy=fsdp")
    assert fsdp["setup"]["strategy"] == "fsdp"
    assert fsdp["training_bytes_with_checkpointing"] == plan.total
    assert fsdp["training_bytes_with_checkpointing"] < fsdp["usable_bytes"]
    from orchestrator.config.schema import TrainSection

    if "gradient_checkpointing" in TrainSection.model_fields:  # the key of issue 18
        configured = plan_json(llama_7b, "resources.num_workers=8", "resources.strategy=fsdp",
                               "train.gradient_checkpointing=true")
        assert configured["fits"] is True and configured["training_bytes"] == plan.total


def test_the_knobs_named_for_an_unfit_run_make_it_fit(llama_7b):
    report = plan_config(load_config(llama_7b, []), 80)
    assert not report.fits and report.knobs
    named = {key for knob in report.knobs for key, _ in knob.settings}
    assert "resources.strategy" in named and "model.lora" in named
    assert all(knob.peak_bytes <= report.usable_bytes for knob in report.knobs)
    text = format_report(report)
    assert "does NOT fit" in text and "--set resources.strategy=fsdp --set resources.num_workers=" in text
    small = plan_json(llama_7b, "model.lora={r: 8}", "model.dtype=bfloat16", "train.micro_batch_size=1")
    assert small["fits"] is True and small["knobs"] == []


def test_refuse_if_unfit_names_the_knobs_and_passes_a_run_that_fits(llama_7b):
    from orchestrator.workflows.plan import refuse_if_unfit

    with pytest.raises(ConfigError, match="resources.strategy=fsdp") as error:
        refuse_if_unfit(load_config(llama_7b, []), 80)
    assert "does not fit" not in str(error.value) and "GiB per GPU" in str(error.value)
    assert refuse_if_unfit(load_config(llama_7b, ["resources.num_workers=8", "resources.strategy=fsdp"]), 80).fits


# ---- counts and the JSON object -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["llama", "gpt2", "qwen2"])
def test_parameter_counts_are_exact(small_models, shape):
    config, model = small_models[shape]
    planned = model_shape_from_config(config)
    assert planned.parameters == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert planned.tied_embeddings == (shape in ("gpt2", "qwen2"))


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_lora_parameters_match_peft(targets):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    config = plan_vs_measured.shape_configs(vocab_size=TEST_VOCAB)["llama"]
    model = peft.get_peft_model(AutoModelForCausalLM.from_config(config),
                                peft.LoraConfig(r=4, target_modules=targets if isinstance(targets, str) else list(targets)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model_shape_from_config(config).lora_parameters(4, targets) == trainable


def test_json_has_the_total_the_verdict_and_the_parts(llama_7b):
    lora = plan_json(llama_7b, "model.lora={r: 16}", "model.dtype=bfloat16", "reference.mode=live")
    assert lora["per_gpu_bytes"] == max(lora["training_bytes"], lora["reference_pass_bytes"])
    assert lora["training_bytes"] == sum(lora["parts"].values())
    assert lora["model"]["trained_parameters"] == 39_976_960  # r=16 on every linear of Llama-2-7B
    assert lora["parts"]["master_copy"] == 4 * lora["model"]["trained_parameters"]  # fp32 adapters only
    assert lora["parts"]["live_reference"] == 0  # the reference is the policy with its adapters off
    assert lora["parts"]["optimizer"] == 8 * lora["model"]["trained_parameters"]
    assert plan_json(llama_7b, gpu="1000")["fits"] is True


def test_a_head_keeping_full_logits_is_shown_for_comparison():
    shape = model_shape_from_config(plan_vs_measured.shape_configs()["qwen2"])  # 151,936-token vocabulary
    plan = plan_memory(shape, TrainingSetup(strategy="single", num_workers=1, micro_batch_pairs=4, seq_len=1024,
                                            compute="bf16"))
    assert plan.parts["logprob_head"] < plan.full_logits_head / 5


# ---- checkpoint and communication (trainables/scale_plan.py) ---------------------------------------------

def scale_json(config: Path, *arguments: str) -> dict:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args([str(config), "--json", *arguments])
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert plan_command(args) == 0
    return json.loads(out.getvalue())


def test_scale_fsdp_on_one_node_checkpoint_and_bytes_per_step(llama_7b, capsys):
    shape = read_model_shape(str(llama_7b.parent / "model"))
    layers = sum(shape.layer_parameters)
    fsdp = scale_json(llama_7b, "--set=resources.num_workers=8", "--set=resources.strategy=fsdp", "--gpus-per-node=8",
                      "--storage-gbps=2")
    checkpoint, communication = fsdp["checkpoint"], fsdp["communication"]
    assert checkpoint["format"] == "sharded" and checkpoint["writers"] == 8
    assert checkpoint["bytes"] == 12 * shape.parameters  # fp32 weights + 2 AdamW moments, nothing gathered
    assert checkpoint["write_seconds"] == pytest.approx(12 * shape.parameters / 2e9, abs=1e-3)
    # 64 pairs over 8 workers, micro-batches of 2: 4 forward/backward passes, each gathering every weight (bf16)
    # for its forward and the decoder layers again for its backward; one fp32 reduce-scatter per step
    assert communication["micro_batches_per_step"] == 4 and communication["mesh"] == [1, 8]
    assert communication["collectives"]["all_gather"] == int((shape.parameters + layers) * 2 * 7 / 8) * 4
    assert communication["collectives"]["reduce_scatter"] == int(shape.parameters * 4 * 7 / 8)
    assert communication["between_nodes_bytes"] == 0
    print(format_report(plan_config(load_config(llama_7b, ["resources.num_workers=8", "resources.strategy=fsdp"]),
                                    gpus_per_node=8)))
    assert "checkpoint: 75.3 GiB, sharded, 8 ranks write 9.4 GiB each" in capsys.readouterr().out


def test_scale_fsdp_over_two_nodes_is_hsdp_sharded_within_a_node(llama_7b):
    shape = read_model_shape(str(llama_7b.parent / "model"))
    hsdp = scale_json(llama_7b, "--set=resources.num_workers=16", "--set=resources.strategy=fsdp", "--gpus-per-node=8")
    one_node = scale_json(llama_7b, "--set=resources.num_workers=16", "--set=resources.strategy=fsdp")
    assert hsdp["communication"]["mesh"] == [2, 8] and one_node["communication"]["mesh"] == [1, 16]
    # the engine replicates across nodes: each GPU holds 1/8 of the optimizer state, not 1/16
    assert hsdp["parts"]["optimizer"] == 8 * shape.parameters // 8 == 2 * one_node["parts"]["optimizer"]
    # between the nodes only the all-reduce of each GPU's 1/8 of the fp32 gradients with its one replica
    assert hsdp["communication"]["between_nodes_bytes"] == hsdp["communication"]["collectives"]["all_reduce"]
    assert hsdp["communication"]["collectives"]["all_reduce"] == 2 * int(shape.parameters * 4 / 8 / 2)


def test_scale_ddp_and_lora_checkpoints_are_written_by_rank_0(llama_7b):
    shape = read_model_shape(str(llama_7b.parent / "model"))
    ddp = scale_json(llama_7b, "--set=resources.num_workers=8", "--set=resources.strategy=ddp")
    assert ddp["checkpoint"]["format"] == "single" and ddp["checkpoint"]["writers"] == 1
    assert ddp["checkpoint"]["bytes"] == 4 * shape.parameters + 8 * shape.parameters  # fp32 model + AdamW
    assert ddp["communication"]["collectives"] == {"all_reduce": 2 * int(4 * shape.parameters * 7 / 8)}
    lora = scale_json(llama_7b, "--set=model.lora={r: 16}", "--set=model.dtype=bfloat16")
    assert lora["checkpoint"]["bytes"] == 12 * lora["model"]["trained_parameters"]  # adapters and their AdamW state
    assert lora["communication"]["bytes_per_gpu_per_step"] == 0  # one worker


# ---- bad input ------------------------------------------------------------------------------------------

def test_a_model_path_without_config_json_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.path"):
        plan_config(load_config(write_experiment(tmp_path, tmp_path / "empty"), []))


def test_an_unknown_model_type_is_a_config_error(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model.path.*odd"):
        plan_config(load_config(write_experiment(tmp_path, tmp_path / "odd"), []))


@pytest.mark.parametrize("shape,bf16", [("llama", False), ("gpt2", True)])
def test_reference_pass_is_within_25_percent_of_its_measured_peak(shape, bf16):
    """Forward-only, no_grad, 16 pairs: a vocabulary of 2,000 so that a layer's working set, not the head,
    sets the peak (the bench shows the head-bound case with the real vocabularies)."""
    config = plan_vs_measured.shape_configs(vocab_size=2000)[shape]
    measured, planned = plan_vs_measured.measure_reference_pass(shape, config, plan_vs_measured.StepSettings(bf16=bf16),
                                                                pairs=16)
    assert 0.75 <= planned / measured <= 1.25, f"planned {planned}, measured {measured}"


# ---- dpo sweep / dpo study refuse a trial that cannot fit, before Ray starts ---------------------------

@pytest.fixture(scope="module")
def tiny_gpu_experiment(tmp_path_factory) -> Path:
    """A real tiny Llama and pairs (a sweep loads them first), with trials on a GPU that two of them share."""
    from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

    root = tmp_path_factory.mktemp("plan-sweep")
    model = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1))
    import yaml

    path = write_experiment(root, model, data={"train": str(train), "max_length": 48},
                            train={"batch_size": 4, "max_steps": 1},
                            resources={"use_gpu": True, "gpus_per_worker": 0.5}, tracking={"enabled": False})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "storage_path": str(root / "runs")}))
    return path


def fake_gpu(monkeypatch, gib: float | None) -> None:
    from orchestrator.workflows import plan

    monkeypatch.setattr(plan, "local_gpu_memory_bytes", lambda: None if gib is None else int(gib * GIB))


def test_sweep_refuses_a_trial_that_cannot_fit_the_gpu_before_ray_starts(tiny_gpu_experiment, monkeypatch):
    import ray

    from orchestrator.config.spec import resolve_experiment
    from orchestrator.workflows.sweep import run_sweep

    config = load_config(tiny_gpu_experiment, [])
    peak = plan_config(config, 80).plan.peak
    fake_gpu(monkeypatch, 1.5 * peak / 0.9 / GIB)  # the whole GPU would hold it; the half a trial gets does not
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size|train\.gradient_checkpointing") as error:
        run_sweep(resolve_experiment(config))
    assert "per GPU" in str(error.value)
    assert not ray.is_initialized() and not (tiny_gpu_experiment.parent / "runs").exists()


def test_trials_get_their_share_of_the_gpu_and_cpu_trials_are_not_planned(tiny_gpu_experiment, monkeypatch, caplog):
    from orchestrator.workflows.plan import refuse_unfit_trials

    config = load_config(tiny_gpu_experiment, [])
    peak = plan_config(config, 80).plan.peak
    fake_gpu(monkeypatch, 1.5 * peak / 0.9 / GIB)
    assert refuse_unfit_trials(load_config(tiny_gpu_experiment, ["resources.gpus_per_worker=1"])).fits
    with pytest.raises(ConfigError, match="usable of"):
        refuse_unfit_trials(config)  # what `dpo study` calls with its config
    fake_gpu(monkeypatch, 1e-6)
    assert refuse_unfit_trials(load_config(tiny_gpu_experiment, ["resources.use_gpu=false"])) is None
    fake_gpu(monkeypatch, None)  # no GPU on the driver: skipped, saying how to check
    with caplog.at_level("INFO", logger="orchestrator.workflows.plan"):
        assert refuse_unfit_trials(config) is None
    assert "dpo plan" in caplog.text
