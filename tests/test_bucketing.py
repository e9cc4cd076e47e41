"""Length-bucketed forward: the bucket plan (exact DP), and that bucketing never changes the math.

Bucketed and one-forward runs must give the same sequence/token log-probs, aligned logits and gradients on
a batch of very different lengths, and the same DPO losses (k3 with the cached reference, exact KL with a
live one) over a few optimizer steps; train.padding_buckets rejects 0, negatives and garbage.
Run: `python -m pytest tests/test_bucketing.py -q` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import trainables.logprobs as logprobs
from tests.tiny_world import FOUR_STEP_LOOP, build_model_dir, engine_args, far_apart_pairs, pair_rows, write_jsonl
from trainables.bucketing import FORWARD_COST_TOKENS, padded_tokens, plan_buckets
from trainables.entrypoints import run_dpo
from trainables.modeling import load_causal_lm
from trainables.settings import check_padding_buckets
from trainables.tokenization import collate_pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bucketing")
    model_dir = build_model_dir(root / "model", "llama")
    rows = pair_rows("explicit", 32, seed=3)
    for index, row in enumerate(rows):  # a bimodal length mix: every fourth pair gets a long prompt
        if index % 4 == 0:
            row["prompt"] = " ".join([row["prompt"]] * 4)
    train = write_jsonl(root / "train.jsonl", rows)
    return {"root": root, "model": str(model_dir), "train": str(train)}


# ---- the plan -----------------------------------------------------------------------------------

def brute_force_padded_tokens(lengths: list[int], max_buckets: int) -> int:
    """Fewest padded tokens over every split of the sorted lengths into at most max_buckets contiguous runs."""
    ordered = sorted(lengths)
    best = len(ordered) * ordered[-1]
    for count in range(1, min(max_buckets, len(ordered)) + 1):
        for cuts in itertools.combinations(range(1, len(ordered)), count - 1):
            edges = (0, *cuts, len(ordered))
            best = min(best, sum((b - a) * ordered[b - 1] for a, b in zip(edges, edges[1:])))
    return best


def test_equal_lengths_give_one_bucket_whatever_is_asked():
    for asked in ("auto", 1, 3, 64):
        assert plan_buckets([17] * 64, asked) == [list(range(64))]


def test_a_bimodal_mix_is_split_and_a_narrow_one_is_not():
    bimodal = [12, 60] * 16  # 32 rows: padding everything to 60 wastes 16 * 48 = 768 tokens >> FORWARD_COST_TOKENS
    buckets = plan_buckets(bimodal, "auto")
    assert len(buckets) == 2
    assert sorted(bimodal[row] for row in buckets[0]) == [12] * 16
    narrow = [20, 21] * 16  # 16 padded tokens < FORWARD_COST_TOKENS: not worth a second forward
    assert len(plan_buckets(narrow, "auto")) == 1
    assert FORWARD_COST_TOKENS > 16


def test_every_row_lands_in_exactly_one_bucket_of_ascending_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(3, 90) for _ in range(40)]
    for asked in ("auto", 1, 2, 5, 100):
        buckets = plan_buckets(lengths, asked)
        assert sorted(row for bucket in buckets for row in bucket) == list(range(40))
        longest = [max(lengths[row] for row in bucket) for bucket in buckets]
        shortest = [min(lengths[row] for row in bucket) for bucket in buckets]
        assert all(high < low for high, low in zip(longest, shortest[1:]))  # contiguous in sorted order
        if asked != "auto":
            assert len(buckets) <= asked


@pytest.mark.parametrize("seed", range(6))
def test_the_dp_finds_the_brute_force_minimum(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([5, 9, 14, 30, 31, 70]) for _ in range(rng.randint(2, 9))]
    for max_buckets in (1, 2, 3):
        assert padded_tokens(lengths, plan_buckets(lengths, max_buckets)) == brute_force_padded_tokens(lengths, max_buckets)
    auto = plan_buckets(lengths, "auto", forward_cost_tokens=10)
    auto_cost = padded_tokens(lengths, auto) + 10 * len(auto)
    assert auto_cost == min(brute_force_padded_tokens(lengths, k) + 10 * k for k in range(1, len(lengths) + 1))


@pytest.mark.parametrize("bad", [0, -1, -7, 2.5, "lots", "3", True, None])
def test_bad_padding_buckets_are_rejected(bad):
    with pytest.raises(ValueError, match="padding_buckets"):
        plan_buckets([3, 5], bad)
    with pytest.raises(ValueError):
        check_padding_buckets(bad)


@pytest.mark.parametrize("bad", ["0", "-2", "lots", "2.5", "true", "null", "'3'"])
def test_config_rejects_bad_padding_buckets_and_names_the_key(tmp_path, bad):
    from orchestrator.config import ConfigError, load_config
    from orchestrator.config.spec import resolve_run
    from tests.tiny_world import minimal_config_file

    path = minimal_config_file(tmp_path)
    assert resolve_run(load_config(path)).runtime.padding_buckets == "auto"
    assert resolve_run(load_config(path, ["train.padding_buckets=3"])).runtime.padding_buckets == 3
    with pytest.raises(ConfigError, match=r"train\.padding_buckets: .*\"auto\" or an integer >= 1"):
        load_config(path, [f"train.padding_buckets={bad}"])


# ---- the math -----------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_buckets", [2, 3, "auto", 12])
def test_bucketed_forward_gives_the_same_logps_logits_and_gradients(world, padding_buckets):
    model = load_causal_lm(world["model"])
    batch = collate_pairs(far_apart_pairs(), pad_token_id=3)  # rows of 2 to 62 tokens
    answer_mask = batch["answer_mask"]  # (12, 62)

    def run(buckets):
        model.zero_grad(set_to_none=True)
        out = logprobs.forward_logps(model, batch, keep_logits=True, padding_buckets=buckets)
        loss = out.sequence_logps.sum() + 1e-3 * (out.logits.float().square() * answer_mask[..., None]).sum()
        loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    one, one_grads = run(1)
    many, many_grads = run(padding_buckets)
    assert many.token_logps.shape == one.token_logps.shape and many.logits.shape == one.logits.shape
    assert torch.allclose(many.sequence_logps, one.sequence_logps, atol=1e-5)
    assert torch.allclose(many.token_logps, one.token_logps, atol=1e-5)
    assert torch.equal(many.token_logps[~answer_mask], torch.zeros_like(many.token_logps[~answer_mask]))
    assert torch.allclose(many.logits * answer_mask[..., None], one.logits * answer_mask[..., None], atol=1e-5)
    for a, b in zip(many_grads, one_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bucketed_forward_really_runs_several_smaller_forwards(world):
    model = load_causal_lm(world["model"])
    batch = collate_pairs(far_apart_pairs(), pad_token_id=3)
    with torch.no_grad():
        logprobs.forward_logps(model, batch)  # the log-prob head's one-time probe (two forwards) happens here
    widths: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    with torch.no_grad():
        logprobs.forward_logps(model, batch, padding_buckets=3)
    assert len(widths) == 3 and max(widths) == batch["input_ids"].shape[1] and min(widths) < max(widths)


@pytest.mark.parametrize("preference", [
    dict(dpo__beta=0.1, dpo__kl_weight=0.5),  # cached reference, k3 KL
    dict(dpo__beta=0.1, dpo__kl_weight=0.5, dpo__kl_estimator="exact", reference__mode="live"),  # live reference, exact KL
], ids=["precomputed-k3", "live-exact"])
def test_training_losses_are_the_same_bucketed_or_not(world, tmp_path, monkeypatch, preference):
    plans: list[int] = []

    def counting(lengths, asked, *rest):
        plan = plan_buckets(lengths, asked, *rest)
        plans.append(len(plan))
        return plan

    monkeypatch.setattr(logprobs, "plan_buckets", counting)
    runs = {}
    for buckets in (1, 4):
        reports: list[dict] = []
        spec = engine_args(world["model"], world["train"], world["train"], reference_cache=tmp_path / "cache",
                           output_dir=tmp_path / str(buckets), data__max_length=64, **preference, **FOUR_STEP_LOOP,
                           train__device="cpu", train__padding_buckets=buckets, train__eval_batch_size=8,
                           train__share_prompt=False)  # the standard forward's buckets; shared rows: test_shared_prompt.py
        run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
                lambda metrics, checkpoint: reports.append(metrics))
        runs[buckets] = reports
    assert plans and max(plans) > 1  # the bucketed run did split its micro-batches
    for one, many in zip(runs[1], runs[4], strict=True):
        for key in ("train/loss", "train/preference_loss", "train/kl", "train/logp_chosen", "train/grad_norm"):
            assert abs(one[key] - many[key]) < 1e-5, key
    assert runs[1][-1]["train/kl"] > 0 and abs(runs[1][-1]["eval/loss"] - runs[4][-1]["eval/loss"]) < 1e-5
