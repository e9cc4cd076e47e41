"""Every preference loss of the family trains through the engine, and starts where its formula says.

`dpo.loss` (a name or a list), with its options, goes config -> RunSpec -> the engine's objective
(trainables/dpo_objective.py). On the tiny world, one optimizer step per loss: the run finishes with finite
metrics, reference-free losses run with no reference at all, and for every loss that reads a reference the
first logged `train/loss` equals the loss at zero policy-reference log-ratio (the policy starts as the
reference): ln 2 for sigmoid, (1 / (2 beta))^2 for ipo, 1 for hinge, and so on. bco_pair's running reward
mean is saved in each checkpoint and restored on resume.

Run: `python -m pytest tests/test_losses_engine.py -q`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.checkpointing import latest_checkpoint, load_training_state
from trainables.entrypoints import run_dpo
from trainables.loss_options import LOSS_NAMES, REFERENCE_FREE_LOSSES
from trainables.preference_loss import loss_at_zero_log_ratio

BETA = 0.1
# The settings a loss cannot run without (the config refuses it otherwise).
REQUIRED = {"cdpo": dict(dpo__label_smoothing=0.1), "exo_pair": dict(dpo__label_smoothing=1e-3)}
# One step of 4 pairs, eval of 4 pairs: seconds per loss on 2 CPU cores.
ONE_STEP = dict(data__max_length=32, dpo__beta=BETA, train__device="cpu", train__learning_rate=1e-2,
                train__batch_size=4, train__micro_batch_size=4, train__max_steps=1, train__warmup_steps=0,
                train__eval_every=1, train__checkpoint_every=1, train__keep_checkpoints=1, train__log_every=1,
                train__seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("losses_engine")
    model_dir = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1))
    eval_ = write_jsonl(root / "eval.jsonl", pair_rows("explicit", 4, seed=2))
    return {"root": root, "model": str(model_dir), "train": str(train), "eval": str(eval_)}


def train(world, output_dir: Path, **settings) -> tuple[list[dict], object]:
    spec = engine_args(world["model"], world["train"], world["eval"], output_dir=output_dir,
                       reference_cache=world["root"] / "cache", **{**ONE_STEP, **settings})
    reports: list[dict] = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
            lambda metrics, checkpoint: reports.append({**metrics, "checkpoint": checkpoint}))
    return reports, spec


def check_first_loss(reports: list[dict], spec) -> None:
    first = reports[0]
    assert all(math.isfinite(value) for key, value in first.items() if isinstance(value, float)), first
    expected = loss_at_zero_log_ratio(spec.preference.loss, BETA)
    if spec.preference.loss.needs_reference:
        assert spec.preference.reference_mode == "precomputed"
        assert first["eval/kl"] >= 0 and "eval/log_ratio_chosen" in first
    else:
        assert spec.preference.reference_mode == "none"  # resolved so: no reference model, no cache
        assert "train/kl" not in first and "eval/kl" not in first
    if expected is not None:
        assert first["train/loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_trains_and_starts_at_its_zero_log_ratio_value(world, tmp_path, name):
    reports, spec = train(world, tmp_path, dpo__loss=name, **REQUIRED.get(name, {}))
    assert spec.preference.loss.names == (name,)
    assert (name in REFERENCE_FREE_LOSSES) == (not spec.preference.loss.needs_reference)
    check_first_loss(reports, spec)
    if name == "sigmoid":
        assert reports[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    if name == "ipo":
        assert reports[0]["train/loss"] == pytest.approx((1 / (2 * BETA)) ** 2, rel=1e-4)


@pytest.mark.parametrize("settings", [
    dict(dpo__loss=["sigmoid", "sft"], dpo__loss_weights=[1.0, 0.5]),  # RPO
    dict(dpo__loss="sigmoid", dpo__use_weighting=True),  # WPO
    dict(dpo__loss="sigmoid", dpo__ld_alpha=0.5),  # LD-DPO
    dict(dpo__loss="sigmoid", dpo__f_divergence="js_divergence"),
    dict(dpo__loss="simpo", dpo__simpo_gamma=1.0, dpo__ld_alpha=0.5),
], ids=["rpo", "wpo", "ld_dpo", "f_js", "simpo_ld"])
def test_loss_options_train(world, tmp_path, settings):
    reports, spec = train(world, tmp_path, **settings)
    check_first_loss(reports, spec)
    if spec.preference.loss.f_divergence == "js_divergence":  # s_w = s_l at u = 0: still ln 2
        assert reports[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_bco_pair_running_mean_is_checkpointed_and_restored(world, tmp_path):
    two_steps = dict(dpo__loss="bco_pair", train__max_steps=2, train__checkpoint_every=1, train__keep_checkpoints=None)
    straight, _ = train(world, tmp_path / "straight", **two_steps)
    first = sorted((tmp_path / "straight" / "checkpoints").iterdir())[0]
    state = load_training_state(first)["extra"]["objective"]["preference_loss"]["bco_pair"]
    assert state["reward_count"] == 8.0  # 4 pairs x (chosen, rejected) rewards after step 1
    # Resume from step 1's checkpoint: step 2 must see step 1's rewards in its mean, as the straight run did.
    import shutil
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000002")
    resumed, _ = train(world, tmp_path / "resumed", train__resume_from="latest", **two_steps)
    assert resumed[-1]["step"] == 2
    assert resumed[-1]["train/loss"] == pytest.approx(straight[-1]["train/loss"], abs=1e-6)
    final = load_training_state(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert final["extra"]["objective"]["preference_loss"]["bco_pair"]["reward_count"] == 16.0


def test_eval_kl_is_the_exact_full_vocabulary_kl_against_brute_force(world):
    """eval/kl = mean over held-out answer tokens of sum_v p(v) (log p(v) - log q(v)), p the policy's and q the
    reference's next-token distribution, here recomputed token by token in float64 from each full sequence."""
    from trainables.dpo_objective import DPOObjective, LiveReference, ReferenceDistributions
    from trainables.entrypoints import load_preference_data
    from trainables.modeling import load_causal_lm
    from trainables.preference_loss import build_preference_loss

    spec = engine_args(world["model"], world["train"], world["eval"], **ONE_STEP)
    data = load_preference_data(spec.model, spec.data)
    reference = load_causal_lm(world["model"]).eval()
    policy = load_causal_lm(world["model"]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():  # a policy some distance from the reference
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    objective = DPOObjective(
        train_pairs=data.train, eval_pairs=data.eval, reference=LiveReference(reference, False, None),
        loss=build_preference_loss(spec.preference.loss), beta=BETA, kl_weight=0.0, exact_kl=False,
        pad_token_id=data.tokenizer.pad_token_id, device=torch.device("cpu"), autocast_dtype=None, eval_batch_size=3,
        padding_buckets=1, reference_distributions=ReferenceDistributions(
            lambda: LiveReference(reference, True, None, share_prompt=False)))
    metrics = objective.evaluate(policy)

    total, tokens, log_ratios = 0.0, 0, []
    policy64, reference64 = policy.double(), reference.double()
    with torch.no_grad():
        for pair in data.eval:
            for answer in (pair.chosen_ids, pair.rejected_ids):
                ids = torch.tensor([list(pair.prompt_ids) + list(answer)])
                log_p = torch.log_softmax(policy64(ids).logits[0], -1)  # (seq, vocab)
                log_q = torch.log_softmax(reference64(ids).logits[0], -1)
                start = len(pair.prompt_ids)
                for t in range(start, ids.shape[1]):  # the distribution over token t comes from position t - 1
                    total += float((log_p[t - 1].exp() * (log_p[t - 1] - log_q[t - 1])).sum())
                    tokens += 1
                positions = torch.arange(start - 1, ids.shape[1] - 1)
                targets = ids[0, start:]
                log_ratios.append(float((log_p[positions, targets] - log_q[positions, targets]).sum()))
    assert tokens == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in data.eval)
    assert total / tokens > 1e-3  # the perturbation moved the policy: the check is not 0 = 0
    assert metrics["eval/kl"] == pytest.approx(total / tokens, abs=1e-5)
    pairs = len(data.eval)
    assert metrics["eval/log_ratio_chosen"] == pytest.approx(sum(log_ratios[0::2]) / pairs, abs=1e-4)
    assert metrics["eval/log_ratio_rejected"] == pytest.approx(sum(log_ratios[1::2]) / pairs, abs=1e-4)
    assert metrics["eval/kl_penalty"] >= 0  # k2 on the dataset tokens, beside the exact value
    margins = [BETA * (chosen - rejected) for chosen, rejected in zip(log_ratios[0::2], log_ratios[1::2])]
    length_differences = [len(p.chosen_ids) - len(p.rejected_ids) for p in data.eval]
    expected = float(torch.corrcoef(torch.tensor([margins, length_differences], dtype=torch.float64))[0, 1])
    assert metrics["eval/margin_length_correlation"] == pytest.approx(expected, abs=1e-4)


def test_kl_values_stay_sane_on_a_short_quickstart_like_run(world, tmp_path):
    """Twelve steps at a high learning rate (the quickstart's pace on a smaller model): every train/kl (the
    finite k2 penalty) and eval/kl (exact) stays a few nats per token at most, far below 50."""
    reports, _ = train(world, tmp_path, train__max_steps=12, train__learning_rate=2e-2, train__eval_every=4,
                       train__checkpoint_every=12, train__log_every=1)
    kl_values = [report[key] for report in reports for key in ("train/kl", "eval/kl") if key in report]
    assert len(kl_values) >= 12 + 3
    assert all(math.isfinite(value) and 0 <= value < 50 for value in kl_values), kl_values
    assert max(report["eval/kl"] for report in reports if "eval/kl" in report) > 1e-4  # the policy did move


def test_wpo_log_sum_of_squares_comes_from_the_log_prob_head_as_from_the_full_logits(world):
    """WPO's log sum_v p(v)^2 per answer token, filled by the chunked head (no logits kept), equals the same
    from the model's full logits, bucketed or not, and leaves the log-probs' gradient unchanged."""
    from trainables import answer_head
    from trainables.entrypoints import load_preference_data
    from trainables.logprobs import forward_logps
    from trainables.loss_family import log_sum_squared_probs
    from trainables.modeling import load_causal_lm
    from trainables.tokenization import collate_pairs

    spec = engine_args(world["model"], world["train"], **ONE_STEP)
    data = load_preference_data(spec.model, spec.data)
    model = load_causal_lm(world["model"])
    batch = collate_pairs(data.train[:4], data.tokenizer.pad_token_id)
    with torch.no_grad():
        full = forward_logps(model, batch, keep_logits=True)  # (rows, seq, vocab) logits, aligned
    expected = log_sum_squared_probs(full.logits) * batch["answer_mask"]  # (rows, seq)
    for buckets in (1, 2):
        head = forward_logps(model, batch, padding_buckets=buckets, log_sum_sq=True)
        assert getattr(model, answer_head._DECISION) is True and head.logits is None  # the chunked head ran
        torch.testing.assert_close(head.log_sum_sq_probs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(forward_logps(model, batch, keep_logits=True, log_sum_sq=True).log_sum_sq_probs, expected)
    gradients = []
    for log_sum_sq in (False, True):
        model.zero_grad()
        forward_logps(model, batch, log_sum_sq=log_sum_sq).sequence_logps.sum().backward()
        gradients.append(model.get_output_embeddings().weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1], atol=0, rtol=0)


def config_of(tmp_path, **dpo):
    from orchestrator.config.schema import ExperimentConfig

    return ExperimentConfig.model_validate({"name": "c", "model": {"path": str(tmp_path)}, "data": {"train": "t.jsonl"},
                                            "dpo": dpo})


def test_dpo_loss_config_resolves_into_the_run_specs_loss_spec(tmp_path):
    from orchestrator.config.loading import load_config
    from orchestrator.config.spec import resolve_run
    from tests.tiny_world import minimal_config_file

    rpo = resolve_run(config_of(tmp_path, loss=["sigmoid", "sft"], loss_weights=[1.0, 0.2], ld_alpha=0.5,
                                f_divergence="alpha_divergence", f_alpha=0.3)).preference.loss
    assert (rpo.names, rpo.weights, rpo.ld_alpha, rpo.f_divergence, rpo.f_alpha) == (
        ("sigmoid", "sft"), (1.0, 0.2), 0.5, "alpha_divergence", 0.3)
    from_cli = load_config(minimal_config_file(tmp_path), ["dpo.loss=sigmoid,sft", "dpo.use_weighting=true"])
    assert from_cli.dpo.loss_spec().names == ("sigmoid", "sft") and from_cli.dpo.use_weighting
    simpo = config_of(tmp_path, loss="simpo", simpo_gamma=1.0)
    assert simpo.reference.mode == "none" and resolve_run(simpo).preference.reference_mode == "none"


@pytest.mark.parametrize(("dpo", "message"), [
    (dict(loss="dpo"), "dpo.loss: unknown preference loss 'dpo'"),
    (dict(loss=["sigmoid", "sft"], loss_weights=[1.0]), "dpo.loss_weights: one weight per name"),
    (dict(loss="simpo", kl_weight=0.1), r"dpo.kl_weight: must be 0 \(dpo.loss simpo is reference-free"),
    (dict(loss="sigmoid", label_smoothing=0.1), "dpo.label_smoothing: only used by dpo.loss=cdpo"),
    (dict(loss="nca_pair", f_divergence="forward_kl"), "dpo.f_divergence"),
    (dict(loss="aot", use_weighting=True), "dpo.use_weighting"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(kl_estimator="k3"), "kl_estimator"),
])
def test_bad_loss_settings_are_refused_naming_the_key(tmp_path, dpo, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        config_of(tmp_path, **dpo)
