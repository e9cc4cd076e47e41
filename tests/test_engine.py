"""The DPO engine without Ray: log-probs, reference cache, train loop, checkpoints and resume.

Run: `python -m pytest tests/test_engine.py -q` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestrator.config.spec import RunSpec
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.checkpointing import latest_checkpoint, list_checkpoints
from trainables.entrypoints import load_preference_data, precompute_reference, run_dpo, run_sft
from trainables.logprobs import forward_logps, split_chosen_rejected, token_logps_from_logits
from trainables.loop import NonFiniteLossError, global_batch_indices
from trainables.modeling import load_causal_lm
from trainables.tokenization import collate_pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("engine")
    model_dir = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 48, seed=1))
    eval_ = write_jsonl(root / "eval.jsonl", pair_rows("explicit", 16, seed=2))
    return {"root": root, "model": str(model_dir), "train": str(train), "eval": str(eval_)}


# The config of these tests: 48 tokens, beta 0.1, on the CPU, 6 steps of 8 pairs, eval and checkpoints every 3 steps.
TINY_RUN = dict(data__max_length=48, dpo__beta=0.1, train__device="cpu", train__learning_rate=5e-3,
                train__batch_size=8, train__micro_batch_size=8, train__max_steps=6, train__warmup_steps=0,
                train__schedule="cosine", train__weight_decay=0.0, train__max_grad_norm=1.0, train__eval_every=3,
                train__checkpoint_every=3, train__keep_checkpoints=None, train__log_every=1, train__seed=0)


def tiny_run(world, output_dir: Path, *, reference_cache: Path | None = None, stage: str = "dpo", **settings) -> RunSpec:
    """TINY_RUN on the world's pairs, with `settings` (config keys, "__" for the dot) on top."""
    return engine_args(world["model"], world["train"], world["eval"], stage=stage, output_dir=output_dir,
                       reference_cache=reference_cache or world["root"] / "cache", **{**TINY_RUN, **settings})


def run(world, output_dir, **settings) -> list[dict]:
    reports: list[dict] = []
    spec = tiny_run(world, output_dir, **settings)
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
            lambda metrics, checkpoint: reports.append({**metrics, "checkpoint": checkpoint}))
    return reports


def test_token_logps_equal_full_log_softmax_gather(monkeypatch):
    import trainables.logprobs as logprobs

    monkeypatch.setattr(logprobs, "LOGSUMEXP_CHUNK_TOKENS", 5)  # force several chunks
    logits = torch.randn(3, 7, 11)  # (rows, seq, vocab)
    ids = torch.randint(0, 11, (3, 7))
    expected = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (rows, seq-1)
    got = token_logps_from_logits(logits, ids)
    assert torch.allclose(got[:, 1:], expected, atol=1e-6)
    assert torch.all(got[:, 0] == 0)


def test_padding_never_changes_sequence_logps(world):
    spec = engine_args(world["model"], world["train"], data__max_length=48)
    data = load_preference_data(spec.model, spec.data)
    model = load_causal_lm(world["model"]).eval()
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in data.train]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    pad = data.tokenizer.pad_token_id
    with torch.no_grad():
        alone = forward_logps(model, collate_pairs([data.train[short]], pad)).sequence_logps  # (2,)
        batched = forward_logps(model, collate_pairs([data.train[short], data.train[long]], pad)).sequence_logps  # (4,)
    chosen, rejected = split_chosen_rejected(batched)
    assert torch.allclose(alone, torch.stack([chosen[0], rejected[0]]), atol=1e-5)


def test_first_loss_is_ln2_and_metrics_use_architecture_names(world, tmp_path):
    reports = run(world, tmp_path / "out", train__max_steps=3)
    first = reports[0]
    assert first["step"] == 1
    assert abs(first["train/loss"] - math.log(2)) < 1e-4
    assert abs(first["train/reward_margin"]) < 1e-4
    assert first["train/kl"] < 1e-6
    for key in ("train/preference_accuracy", "train/reward_chosen", "train/reward_rejected", "train/logp_chosen",
                "train/logp_rejected", "train/grad_norm", "train/lr", "train/tokens_per_second"):
        assert key in first
    assert any("eval/preference_accuracy" in r for r in reports)
    assert reports[-1]["step"] == 3 and reports[-1]["checkpoint"]


def test_training_moves_margin_up(world, tmp_path):
    reports = run(world, tmp_path / "out", train__max_steps=12, train__eval_every=12, train__checkpoint_every=12)
    assert reports[-1]["eval/reward_margin"] > 0
    assert reports[-1]["train/loss"] < math.log(2)


def test_resume_reproduces_uninterrupted_losses(world, tmp_path):
    straight = run(world, tmp_path / "straight")
    partial_dir = tmp_path / "partial"
    run(world, partial_dir, train__max_steps=6, train__checkpoint_every=3, train__keep_checkpoints=None)
    step3 = partial_dir / "checkpoints" / "step-000003"
    assert step3.is_dir()
    resumed = run(world, tmp_path / "resumed", train__resume_from=str(step3))
    assert [r["step"] for r in resumed][0] == 4
    straight_losses = {r["step"]: r["train/loss"] for r in straight}
    for record in resumed:
        assert abs(record["train/loss"] - straight_losses[record["step"]]) < 1e-6


def test_gradient_accumulation_matches_full_batch(world, tmp_path):
    full = run(world, tmp_path / "full", train__max_steps=3)
    accumulated = run(world, tmp_path / "accumulated", train__max_steps=3, train__micro_batch_size=2)
    for a, b in zip(full, accumulated):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5


def test_precomputed_reference_is_cached_and_equals_live(world, tmp_path):
    cache = tmp_path / "cache"
    spec = tiny_run(world, tmp_path / "out", reference_cache=cache)
    args, runtime = spec.preference, spec.runtime
    data = load_preference_data(spec.model, spec.data)
    _, _, key, reused = precompute_reference(spec.model, args, data, runtime)
    assert not reused and len(list(cache.glob("*.safetensors"))) == 1
    _, _, key_again, reused_again = precompute_reference(spec.model, args, data, runtime)
    assert reused_again and key_again == key
    shorter = load_preference_data(spec.model, replace(spec.data, max_length=12))
    _, _, key_short, _ = precompute_reference(spec.model, args, shorter, runtime)
    assert key_short != key
    cached = run(world, tmp_path / "cached", reference_cache=cache, train__max_steps=3)
    live = run(world, tmp_path / "live", reference_cache=cache, reference__mode="live", train__max_steps=3)
    for a, b in zip(cached, live):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5


def test_kl_weight_adds_penalty_after_policy_moves(world, tmp_path):
    reports = run(world, tmp_path / "kl", dpo__kl_weight=1.0, train__max_steps=4, train__eval_every=4,
                  train__checkpoint_every=4)
    assert reports[0]["train/kl"] < 1e-6
    last = reports[-1]
    assert last["train/kl"] > 0
    assert abs(last["train/loss"] - (last["train/preference_loss"] + last["train/kl"])) < 1e-6


def test_exact_kl_with_live_reference(world, tmp_path):
    reports = run(world, tmp_path / "exact", dpo__kl_weight=0.5, dpo__kl_estimator="exact", reference__mode="live",
                  train__max_steps=3)
    assert reports[0]["train/kl"] < 1e-6 and reports[-1]["train/kl"] > 0


def test_non_finite_loss_stops_without_checkpoint(world, tmp_path):
    broken = tmp_path / "broken"
    model = load_causal_lm(world["model"])
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(broken)
    spec = engine_args(world["model"], world["train"])
    load_preference_data(spec.model, spec.data).tokenizer.save_pretrained(broken)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        run({**world, "model": str(broken)}, tmp_path / "out", reference__mode="live")
    assert latest_checkpoint(tmp_path / "out" / "checkpoints") is None


def test_corrupt_checkpoint_is_ignored(world, tmp_path):
    run(world, tmp_path / "out", train__max_steps=6, train__checkpoint_every=3, train__keep_checkpoints=None)
    checkpoints = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert [c.name for c in checkpoints] == ["step-000003", "step-000006"]
    (checkpoints[-1] / "training_state.pt").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path / "out" / "checkpoints") == checkpoints[0]


def test_data_order_is_a_deterministic_epoch_permutation():
    first_epoch = global_batch_indices(0, 10, 5, seed=3) + global_batch_indices(1, 10, 5, seed=3)
    assert sorted(first_epoch) == list(range(10))
    assert global_batch_indices(2, 10, 5, seed=3) == global_batch_indices(2, 10, 5, seed=3)
    assert global_batch_indices(0, 10, 5, seed=3) != global_batch_indices(0, 10, 5, seed=4)


def test_sft_lowers_answer_loss(world, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows("explicit", 32, seed=5)]
    sft_file = write_jsonl(tmp_path / "sft.jsonl", rows)
    reports: list[dict] = []
    spec = tiny_run(world, tmp_path / "sft", stage="sft", data__sft_train=str(sft_file), data__sft_eval=str(sft_file),
                    train__max_steps=10, train__eval_every=10, train__checkpoint_every=10, train__learning_rate=1e-2)
    run_sft(spec.model, spec.data, spec.loop, spec.runtime, lambda m, c: reports.append(m))
    assert reports[-1]["train/loss"] < reports[0]["train/loss"]
    assert "eval/perplexity" in reports[-1]


def test_lora_trains_adapters_and_resumes(world, tmp_path):
    """LoRA: only adapters train; the live reference is the adapter-disabled policy; resume is exact."""
    def run_lora(output_dir, resume_from=None):
        return run(world, output_dir, model__lora={"r": 4, "alpha": 8.0}, reference__mode="live",
                   train__resume_from=resume_from)

    straight = run_lora(tmp_path / "straight")
    assert abs(straight[0]["train/loss"] - math.log(2)) < 1e-4
    assert straight[-1]["train/reward_margin"] != 0
    step3 = tmp_path / "straight" / "checkpoints" / "step-000003"
    assert (step3 / "model" / "adapter_config.json").is_file()
    resumed = run_lora(tmp_path / "resumed", resume_from=str(step3))
    by_step = {r["step"]: r["train/loss"] for r in straight}
    assert resumed[0]["step"] == 4
    for record in resumed:
        assert abs(record["train/loss"] - by_step[record["step"]]) < 1e-6
