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
