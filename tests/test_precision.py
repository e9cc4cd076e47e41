"""Precision done right (issue 18): fp32 master weights computed in bf16 under autocast, 16-bit trained
weights refused before any work, exact resume under bf16 compute, and gradient checkpointing.

Why the refusal: one AdamW step at lr 5e-7 moves a weight by about 5e-7 (Adam's first step is lr x
sign(g)); a bf16 weight near 0.02 has a spacing of 1.2e-4 between representable values, so the update
rounds away and the weight never moves. fp32 (spacing 1.9e-9 there) keeps it.
Run: `python -m pytest tests/test_precision.py -q` (a few seconds).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from orchestrator.config.schema import ExperimentConfig
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.entrypoints import _load_policy, run_dpo
from trainables.loop import build_optimizer
from trainables.modeling import ModelError, attach_lora, load_causal_lm, resolve_autocast_dtype

LR = 5e-7


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64, 2 layers) saved as a user's model would be."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = tmp_path_factory.mktemp("precision") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, safe_serialization=True)
    return directory


def one_step_changed_fraction(model: torch.nn.Module, precision: str) -> tuple[float, int]:
    """One AdamW step at lr 5e-7 of a next-token loss computed as the engine computes (autocast per
    train.precision on the CPU); the fraction of trained elements with a non-zero gradient that changed,
    and how many elements had one."""
    autocast_dtype = resolve_autocast_dtype(precision, torch.device("cpu"))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    build_optimizer(model, LR, weight_decay=0.0).step()
    changed = total = 0
    for parameter, old in zip(trained, before):
        received = parameter.grad != 0
        changed += int(((parameter.detach() != old) & received).sum())
        total += int(received.sum())
    return changed / total, total


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_master_weights_move_in_one_step_at_lr_5e_7(llama_dir, precision):
    """Accepted full-weight settings: model.dtype float32, computed in fp32 or in bf16 under autocast."""
    model = load_causal_lm(str(llama_dir), dtype="float32")
    fraction, total = one_step_changed_fraction(model, precision)
    assert total > 50_000 and fraction >= 0.99, (precision, fraction)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never touched the masters


def test_lora_adapters_over_a_bf16_base_move_in_one_step(llama_dir):
    """Accepted LoRA setting: a frozen bfloat16 base; peft keeps the trained adapters in fp32."""
    pytest.importorskip("peft")
    model = attach_lora(load_causal_lm(str(llama_dir), dtype="bfloat16"), rank=4, alpha=8.0, dropout=0.0,
                        target_modules="all-linear")
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    fraction, total = one_step_changed_fraction(model, "bf16")
    assert total > 1000 and fraction >= 0.99, fraction


def test_bf16_weights_do_not_train_which_is_why_they_are_refused(llama_dir):
    """The refused path, measured: AdamW on bf16 weights (no master copy) rounds most updates away."""
    model = load_causal_lm(str(llama_dir), dtype="bfloat16")
    fraction, _ = one_step_changed_fraction(model, "bf16")
    assert fraction < 0.2, fraction


def config_with(**model) -> dict:
    return {"name": "p", "model": {"path": "m", **model}, "data": {"train": "t.jsonl"}}


@pytest.mark.parametrize("model, lora", [({"dtype": "bfloat16"}, False), ({"dtype": "float16"}, False),
                                         ({"dtype": "float16", "lora": {"r": 4}}, True)])
def test_config_refuses_16_bit_trained_weights_naming_the_key_and_fix(model, lora):
    with pytest.raises(ValidationError) as caught:
        ExperimentConfig.model_validate(config_with(**model))
    message = str(caught.value)
    assert "model.dtype" in message and "train.precision: bf16" in message and "model.dtype: float32" in message


def test_config_accepts_bf16_frozen_base_under_lora_and_fp32_with_bf16_compute():
    ExperimentConfig.model_validate(config_with(dtype="bfloat16", lora={"r": 4}))
    config = ExperimentConfig.model_validate({**config_with(dtype="float32"), "train": {"precision": "bf16"}})
    assert config.train.precision == "bf16" and config.train.gradient_checkpointing is False


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("precision-engine")
    model_dir = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 16, seed=1))
    return {"root": root, "model": str(model_dir), "train": str(train)}


# 4 steps of 8 pairs at 48 tokens on the CPU, bf16 autocast, a checkpoint every 2 steps.
RUN = dict(data__max_length=48, train__device="cpu", train__precision="bf16", train__learning_rate=5e-3,
           train__batch_size=8, train__micro_batch_size=8, train__max_steps=4, train__warmup_steps=0,
           train__eval_every=4, train__checkpoint_every=2, train__keep_checkpoints=None, train__log_every=1)


def run(world, output_dir: Path, **settings) -> list[dict]:
    spec = engine_args(world["model"], world["train"], output_dir=output_dir, reference_cache=world["root"] / "cache",
                       **{**RUN, **settings})
    reports: list[dict] = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
            lambda metrics, checkpoint: reports.append({**metrics, "checkpoint": checkpoint}))
    return reports


def test_engine_refuses_bf16_full_weights_before_any_work(world, tmp_path):
    """The engine's own guard, for argument groups that did not come through the config."""
    spec = engine_args(world["model"], world["train"], output_dir=tmp_path / "out", **RUN)
    with pytest.raises(ModelError, match="model.dtype: bfloat16"):
        run_dpo(replace(spec.model, dtype="bfloat16"), spec.data, spec.preference, spec.loop, spec.runtime,
                lambda metrics, checkpoint: None)
    assert not (tmp_path / "out").exists()


def test_bf16_compute_resumes_exactly_from_fp32_master_weights(world, tmp_path):
    from safetensors.torch import load_file

    straight = run(world, tmp_path / "straight")
    assert abs(straight[0]["train/loss"] - math.log(2)) < 1e-6  # step 0 at ln 2 under bf16 autocast
    step2 = tmp_path / "straight" / "checkpoints" / "step-000002"
    weights = load_file(str(step2 / "model" / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # master weights at their own precision
    resumed = run(world, tmp_path / "resumed", train__resume_from=str(step2))
    losses = {r["step"]: r["train/loss"] for r in straight}
    assert [r["step"] for r in resumed][0] == 3
    for record in resumed:
        assert record["train/loss"] == pytest.approx(losses[record["step"]], abs=1e-6)


# ---- gradient checkpointing ---------------------------------------------------------------------------

def loss_grads_and_saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd keeps for backward outside the checkpointed layers (each
    storage counted once; a checkpointed layer's own input is held by the checkpoint, not counted)."""
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept.values())


def test_gradient_checkpointing_keeps_losses_and_gradients_and_saves_less(llama_dir):
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(2))
    plain = load_causal_lm(str(llama_dir), dtype="float32").train()
    spec_model = engine_args(str(llama_dir), "t.jsonl", train__gradient_checkpointing=True).model
    checkpointed = _load_policy(spec_model, None, torch.device("cpu"), None, gradient_checkpointing=True).train()
    flag = "is_activation_checkpointing" if hasattr(plain, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(checkpointed, flag) and not getattr(plain, flag)
    loss, grads, plain_bytes = loss_grads_and_saved_bytes(plain, ids)
    loss_ckpt, grads_ckpt, ckpt_bytes = loss_grads_and_saved_bytes(checkpointed, ids)
    assert loss_ckpt == pytest.approx(loss, abs=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grads_ckpt[name], grad, atol=1e-5, rtol=0), name
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
