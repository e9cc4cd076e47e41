"""The reference cache key (issue 18): every input that changes reference log-probs changes the key,
a trial handed the sweep's key never hashes the weights, and flash_attention_2 falls back to sdpa.

Run: `python -m pytest tests/test_reference_key.py -q` (a few seconds).
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace

import pytest
import torch

from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables import entrypoints
from trainables.entrypoints import load_preference_data, precompute_reference, reference_key_inputs, run_dpo
from trainables.modeling import load_causal_lm
from trainables.reference_cache import ReferenceKeyInputs, reference_fingerprint
from trainables.tokenization import TokenizedPair

BASE = ReferenceKeyInputs(weights="0123abcd", model_class="LlamaForCausalLM", weight_dtype="float32",
                          compute_dtype="float32", attn_implementation="sdpa")
PAIRS = [TokenizedPair(prompt_ids=[1, 5, 6], chosen_ids=[7, 2], rejected_ids=[8, 9, 2]),
         TokenizedPair(prompt_ids=[1, 4], chosen_ids=[6, 2], rejected_ids=[5, 2])]


@pytest.mark.parametrize("field", [f.name for f in fields(ReferenceKeyInputs)])
def test_each_input_field_changes_the_key(field):
    changed = replace(BASE, **{field: getattr(BASE, field) + "-other"})
    assert reference_fingerprint(changed, PAIRS) != reference_fingerprint(BASE, PAIRS)
    assert reference_fingerprint(BASE, PAIRS) == reference_fingerprint(replace(BASE), PAIRS)  # and nothing else does


@pytest.mark.parametrize("change", ["prompt token", "answer token", "shorter answer", "answer token moved to prompt",
                                    "one pair fewer"])
def test_token_ids_and_lengths_change_the_key(change):
    first, second = PAIRS
    edited = {
        "prompt token": [replace(first, prompt_ids=[1, 5, 7]), second],
        "answer token": [replace(first, chosen_ids=[6, 2]), second],
        "shorter answer": [replace(first, rejected_ids=[8, 2]), second],
        "answer token moved to prompt": [replace(first, prompt_ids=[1, 5, 6, 7], chosen_ids=[2]), second],
        "one pair fewer": [first],
    }[change]
    assert reference_fingerprint(BASE, edited) != reference_fingerprint(BASE, PAIRS)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference-key")
    model_dir = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1))
    return {"root": root, "model": str(model_dir), "train": str(train)}


SMALL = dict(data__max_length=48, train__device="cpu", train__batch_size=4, train__max_steps=1, train__eval_every=1,
             train__checkpoint_every=1, train__log_every=1)


@pytest.mark.parametrize("setting, value", [("model__dtype", "bfloat16"), ("train__precision", "bf16"),
                                            ("model__attn_implementation", "eager"), ("data__max_length", 12)])
def test_config_settings_that_change_reference_logps_change_the_key(world, setting, value):
    """Weight dtype (a LoRA run's frozen bf16 base), compute precision, attention kernel, truncation (12 tokens
    cut these pairs; a max_length that cuts nothing keeps the tokens, and so the key)."""
    lora = {"model__lora": {"r": 4}}
    base = engine_args(world["model"], world["train"], **{**SMALL, **lora})
    other = engine_args(world["model"], world["train"], **{**SMALL, **lora, setting: value})
    data = load_preference_data(base.model, base.data)
    other_data = load_preference_data(other.model, other.data)
    assert (entrypoints.reference_cache_key(base.model, base.preference, data, base.runtime)
            != entrypoints.reference_cache_key(other.model, other.preference, other_data, other.runtime))


def test_key_inputs_name_the_model_class_and_the_usable_kernel(world):
    spec = engine_args(world["model"], world["train"], **SMALL, model__attn_implementation="flash_attention_2")
    inputs = reference_key_inputs(spec.model, spec.preference, spec.runtime)
    assert inputs.model_class == "LlamaForCausalLM" and inputs.weight_dtype == "float32"
    assert inputs.attn_implementation == "sdpa"  # no flash-attn here: the kernel that actually runs


def test_a_trial_given_the_sweeps_key_does_not_hash_the_weights(world, tmp_path, monkeypatch):
    spec = engine_args(world["model"], world["train"], output_dir=tmp_path / "out", reference_cache=tmp_path / "cache",
                       **SMALL)
    data = load_preference_data(spec.model, spec.data)
    _, _, key, reused = precompute_reference(spec.model, spec.preference, data, spec.runtime)  # the driver, once
    assert not reused

    def no_hashing(*args, **kwargs):
        raise AssertionError("a trial hashed the model weights")

    monkeypatch.setattr(entrypoints, "model_fingerprint", no_hashing)
    reports: list[dict] = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
            lambda metrics, checkpoint: reports.append(metrics), data=data, reference_key=key)
    assert reports and reports[-1]["step"] == 1
    with pytest.raises(AssertionError, match="hashed"):  # the guard is real: without the key it would hash
        precompute_reference(spec.model, spec.preference, data, spec.runtime)


def test_flash_attention_2_falls_back_to_sdpa_when_its_import_fails(world, monkeypatch, caplog):
    """flash-attn reported available, but transformers cannot import it (a broken install): a warning and
    sdpa, not a crashed trial."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="trainables.modeling"):
        model = load_causal_lm(world["model"], attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert any("flash_attention_2" in record.getMessage() and "sdpa" in record.getMessage() for record in caplog.records)
    ids = torch.tensor([[1, 5, 6, 2]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
