"""Shared-prompt forward (trainables/shared_prompt.py): the same math as the standard forward, and its guard.

Shared (one row per pair, 4D mask) and standard (2B rows) forwards must give the same token and sequence
log-probs and parameter gradients for a Llama-shaped (rotary) and a GPT-2-shaped (learned absolute
positions) model, on pairs whose prompts and chosen/rejected lengths differ a lot, bucketed or not; the same
DPO losses over a few steps of run_dpo with train.share_prompt true vs false (cached and live reference);
"auto" falls back, and says why, for an attention implementation or a model that does not honour the mask,
on every rank alike; true then errors; the config rejects bad values.
Run: `python -m pytest tests/test_shared_prompt.py -q` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import trainables.shared_prompt as shared_prompt
from tests.tiny_world import FOUR_STEP_LOOP, build_model_dir, engine_args, far_apart_pairs, pair_rows, write_jsonl
from trainables.entrypoints import run_dpo
from trainables.logprobs import forward_logps
from trainables.modeling import load_causal_lm
from trainables.settings import check_share_prompt
from trainables.shared_prompt import collate_shared, decide_share_prompt, shared_forward_logps
from trainables.tokenization import TokenizedPair, collate_pairs

PAD = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shared-prompt")
    return {arch: str(build_model_dir(root / arch, arch)) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, models) -> dict:
    root = tmp_path_factory.mktemp("shared-prompt-run")
    rows = pair_rows("explicit", 24, seed=5)
    for index, row in enumerate(rows):  # prompts of very different lengths
        if index % 3 == 0:
            row["prompt"] = " ".join([row["prompt"]] * 3)
    return {"root": root, "model": models["llama"], "train": str(write_jsonl(root / "train.jsonl", rows))}


# ---- the layout ---------------------------------------------------------------------------------

def test_layout_positions_mask_and_predictors_by_hand():
    pair = TokenizedPair((10, 11), (20, 21), (30, 31, 32))  # P=2, C=2, R=3 -> L=7
    short = TokenizedPair((12,), (22,), (33,))  # P=C=R=1 -> 3 real + 4 pads
    shared = collate_shared([pair, short], PAD)
    assert shared.input_ids.tolist() == [[10, 11, 20, 21, 30, 31, 32], [12, 22, 33, PAD, PAD, PAD, PAD]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 1, 0, 0, 0, 0]]
    allowed = shared.allowed[0].int().tolist()  # query x key
    assert allowed == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],  # chosen sees the prompt and earlier chosen
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0],  # rejected sees the prompt and earlier rejected, never chosen
                       [1, 1, 0, 0, 1, 1, 0],
                       [1, 1, 0, 0, 1, 1, 1]]
    assert shared.allowed[1, :3, :3].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert not shared.allowed[1, :3, 3:].any() and not shared.allowed[1, 3:, :3].any()  # pads: only themselves
    # chosen: pair 0 at outputs 1, 2; pair 1 at 7+0. Rejected: pair 0 at 1 (last prompt token), 4, 5; pair 1 at 7+0.
    assert shared.predictor.tolist() == [1, 2, 7, 1, 4, 5, 7]
    assert shared.targets.tolist() == [20, 21, 22, 30, 31, 32, 33]
    mask = shared_prompt.additive_mask(shared.allowed, torch.float32)  # (2, 1, 7, 7)
    assert mask.shape == (2, 1, 7, 7) and mask.max() == 0 and mask.min() == torch.finfo(torch.float32).min


# ---- the math -----------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_buckets", [1, 3, "auto"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_forward_gives_the_same_logps_and_gradients(models, arch, padding_buckets):
    model = load_causal_lm(models[arch])
    pairs = far_apart_pairs()
    batch = collate_pairs(pairs, PAD)
    answer_mask = batch["answer_mask"]  # (12, 62)
    weights = torch.rand(answer_mask.shape, generator=torch.Generator().manual_seed(1))  # (12, 62): every token counts

    def run(shared: bool):
        model.zero_grad(set_to_none=True)
        if shared:
            out = shared_forward_logps(model, pairs, answer_mask, PAD, padding_buckets)
        else:
            out = forward_logps(model, batch)
        ((out.token_logps * weights).sum() + out.sequence_logps.sum()).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    standard, standard_grads = run(False)
    shared, shared_grads = run(True)
    assert shared.token_logps.shape == standard.token_logps.shape and shared.logits is None
    assert torch.allclose(shared.sequence_logps, standard.sequence_logps, atol=1e-5)
    assert torch.allclose(shared.token_logps, standard.token_logps, atol=1e-5)
    assert torch.equal(shared.token_logps[~answer_mask], torch.zeros_like(shared.token_logps[~answer_mask]))
    for a, b in zip(shared_grads, standard_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preference", [
    dict(dpo__beta=0.1, dpo__kl_weight=0.5),  # cached reference, k3 KL
    dict(dpo__beta=0.1, dpo__kl_weight=0.5, reference__mode="live"),  # live reference (shared too), k3 KL
], ids=["precomputed-k3", "live-k3"])
def test_training_losses_are_the_same_shared_or_not(world, tmp_path, monkeypatch, preference):
    forwards: list[int] = []  # rows of every shared-layout forward
    real_collate = shared_prompt.collate_shared
    monkeypatch.setattr(shared_prompt, "collate_shared",
                        lambda pairs, pad: forwards.append(len(pairs)) or real_collate(pairs, pad))
    runs = {}
    for share in (False, True):
        reports: list[dict] = []
        forwards.clear()
        spec = engine_args(world["model"], world["train"], world["train"], reference_cache=tmp_path / "cache",
                           output_dir=tmp_path / str(share), data__max_length=64, **preference, **FOUR_STEP_LOOP,
                           train__device="cpu", train__share_prompt=share, train__eval_batch_size=8)
        run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
                lambda metrics, checkpoint: reports.append(metrics))
        runs[share] = (reports, len(forwards))
    assert runs[False][1] == 0 and runs[True][1] > 8  # the shared run really used the shared layout
    for standard, shared in zip(runs[False][0], runs[True][0], strict=True):
        for key in ("train/loss", "train/preference_loss", "train/kl", "train/logp_chosen", "train/logp_rejected",
                    "train/grad_norm"):
            assert abs(standard[key] - shared[key]) < 1e-5, key
    assert runs[False][0][-1]["train/kl"] > 0
    assert abs(runs[False][0][-1]["eval/loss"] - runs[True][0][-1]["eval/loss"]) < 1e-5


# ---- the guard ----------------------------------------------------------------------------------

def ignoring_custom_masks(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, made to drop a 4D attention mask and position ids (as remote code rebuilding its own might)."""
    original = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask, position_ids = None, None  # plain causal attention over everything, positions 0..L-1
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    model.forward = forward
    return model


def probe_inputs() -> tuple[list[TokenizedPair], dict[str, torch.Tensor]]:
    pairs = far_apart_pairs()
    return pairs, collate_pairs(pairs, PAD)


def test_auto_keeps_the_shared_forward_when_the_probe_agrees(models, caplog):
    pairs, batch = probe_inputs()
    with caplog.at_level(logging.INFO, logger="trainables.shared_prompt"):
        assert decide_share_prompt(load_causal_lm(models["gpt2"], attn_implementation="eager"), "auto", pairs, batch,
                                   PAD, "policy")
    assert "shared-prompt forward on" in caplog.text
    assert not decide_share_prompt(load_causal_lm(models["gpt2"]), False, pairs, batch, PAD, "policy")


def test_auto_keeps_the_standard_forward_when_one_row_per_pair_saves_too_little(models, caplog):
    """One-token prompts and long answers of equal length: a shared row is nearly as long as two standard
    rows together, so auto refuses (it would only add attention cost); true still uses it."""
    generator = torch.Generator().manual_seed(1)
    ids = lambda count: tuple(torch.randint(4, 28, (count,), generator=generator).tolist())  # noqa: E731
    pairs = [TokenizedPair(ids(1), ids(30) + (2,), ids(30) + (2,)) for _ in range(4)]
    batch = collate_pairs(pairs, PAD)
    model = load_causal_lm(models["llama"])
    with caplog.at_level(logging.WARNING, logger="trainables.shared_prompt"):
        assert decide_share_prompt(model, "auto", pairs, batch, PAD, "policy") is False
    assert "does not pay" in caplog.text
    assert decide_share_prompt(model, True, pairs, batch, PAD, "policy") is True


def test_auto_falls_back_for_a_model_that_ignores_the_mask_and_true_errors(models, caplog):
    pairs, batch = probe_inputs()
    model = ignoring_custom_masks(load_causal_lm(models["llama"]))
    with caplog.at_level(logging.WARNING, logger="trainables.shared_prompt"):
        assert decide_share_prompt(model, "auto", pairs, batch, PAD, "policy") is False
    assert "standard forward" in caplog.text and "probe" in caplog.text
    with pytest.raises(ValueError, match="share_prompt=true but probe"):
        decide_share_prompt(model, True, pairs, batch, PAD, "policy")


def test_auto_falls_back_without_a_probe_for_flash_attention(models, caplog, monkeypatch):
    pairs, batch = probe_inputs()
    model = load_causal_lm(models["llama"])
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    monkeypatch.setattr(shared_prompt, "shared_forward_logps", lambda *a, **k: pytest.fail("probed anyway"))
    with caplog.at_level(logging.WARNING, logger="trainables.shared_prompt"):
        assert decide_share_prompt(model, "auto", pairs, batch, PAD, "policy") is False
    assert "'flash_attention_2' does not take a custom 4D mask" in caplog.text
    with pytest.raises(ValueError, match="flash_attention_2"):
        decide_share_prompt(model, True, pairs, batch, PAD, "policy")


def test_a_run_with_a_mask_ignoring_model_falls_back_and_trains(world, tmp_path, monkeypatch, caplog):
    import trainables.entrypoints as entrypoints

    real_load = entrypoints.load_causal_lm
    monkeypatch.setattr(entrypoints, "load_causal_lm", lambda *a, **k: ignoring_custom_masks(real_load(*a, **k)))
    reports: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="trainables.shared_prompt"):
        spec = engine_args(world["model"], world["train"], reference_cache=tmp_path / "cache", output_dir=tmp_path,
                           data__max_length=64, dpo__beta=0.1, reference__mode="live", **FOUR_STEP_LOOP,
                           train__device="cpu")
        run_dpo(spec.model, spec.data, spec.preference, replace(spec.loop, max_steps=1), spec.runtime,
                lambda metrics, checkpoint: reports.append(metrics))
    assert "policy: standard forward" in caplog.text and "live reference: standard forward" in caplog.text
    assert abs(reports[0]["train/reward_margin"]) < 1e-6  # policy == reference at step 1, both standard


def _rank_probe(rank: int, rendezvous: str, model_dir: str, verdicts: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        model = load_causal_lm(model_dir)
        if rank == 1:
            model = ignoring_custom_masks(model)  # only rank 1's probe disagrees
        pairs, batch = probe_inputs()
        verdict = decide_share_prompt(model, "auto", pairs, batch, PAD, f"rank {rank}")
        Path(verdicts, str(rank)).write_text(str(verdict))
    finally:
        dist.destroy_process_group()


def test_every_rank_makes_the_same_choice(models, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_probe, args=(str(tmp_path / "rendezvous"), models["llama"], str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["False", "False"]


# ---- the config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["yes please", "2", "null", "'true'", "1.5"])
def test_config_rejects_bad_share_prompt_and_names_the_key(tmp_path, bad):
    from orchestrator.config import ConfigError, load_config
    from orchestrator.config.spec import resolve_run
    from tests.tiny_world import minimal_config_file

    path = minimal_config_file(tmp_path)
    assert resolve_run(load_config(path)).runtime.share_prompt == "auto"
    assert resolve_run(load_config(path, ["train.share_prompt=false"])).runtime.share_prompt is False
    assert resolve_run(load_config(path, ["train.share_prompt=true"])).runtime.share_prompt is True
    with pytest.raises(ConfigError, match=r"train\.share_prompt: .*\"auto\""):
        load_config(path, [f"train.share_prompt={bad}"])


@pytest.mark.parametrize("bad", [1, 0, "true", "Auto", None, 0.5])
def test_check_share_prompt_rejects_non_bools(bad):
    with pytest.raises(ValueError, match="auto"):
        check_share_prompt(bad)
