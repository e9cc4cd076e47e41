"""Acceptance of the embedded default: `dpo train configs/quickstart.yaml` as shipped, and what `dpo quickstart`'s
end summary shows about the model it exported.

DPO starts from `demo:sft_model` (built once per session in the shared `demo_cache`, about a minute on 2 CPU
cores) at ln 2 and must reach held-out preference accuracy >= 0.9; the trained model must still answer the
task, which the summary shows as the benchmark of the start model against the trained one and as sample
answers to held-out prompts. The time limit itself is measured by hand, never asserted here.
Run: `python -m pytest tests/test_quickstart.py -q`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.config import load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs/quickstart.yaml"


@pytest.mark.integration
def test_quickstart_reaches_090_preference_accuracy_and_still_answers_the_task(tmp_path, demo_cache):
    from orchestrator.workflows.demo_assets import build_demo_assets
    from orchestrator.workflows.downstream import downstream_check

    overrides = [f"output_dir={tmp_path / 'out'}", f"reference.cache_dir={tmp_path / 'cache'}"]
    exit_code = main(["train", str(QUICKSTART), *[item for value in overrides for item in ("--set", value)]])
    assert exit_code == 0
    config = load_config(QUICKSTART, overrides)
    assert config.model.path == str(build_demo_assets().sft_model_dir)  # DPO starts from the SFT model
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1
    assert abs(records[0]["train/loss"] - math.log(2)) < 1e-4  # policy == reference at the start
    final = [r for r in records if "eval/preference_accuracy" in r][-1]
    assert final["step"] == config.train.max_steps
    assert final["eval/preference_accuracy"] >= 0.9
    assert final["eval/reward_margin"] > 0
    # issue 21: the KL users read stays a sane number of nats per answer token (k3 reached 4e9 here)
    kl_values = [r[key] for r in records for key in ("train/kl", "eval/kl") if key in r]
    assert kl_values and all(0 <= value < 50 for value in kl_values), max(kl_values)

    # What `dpo quickstart` prints after its export, here for the model this run trained.
    trained = Path([r for r in records if "checkpoint" in r][-1]["checkpoint"]) / "model"  # the last step's
    check = downstream_check(config, trained)
    assert set(check.before) == set(check.after) == {"exact_match"}
    assert check.before["exact_match"] >= 0.9 and check.after["exact_match"] >= 0.9, (check.before, check.after)
    assert len(check.answers) == 3 and sum(sample.correct for sample in check.answers) >= 2, check.answers
    lines = check.lines()
    before, after = check.before["exact_match"], check.after["exact_match"]
    assert lines[0] == (f"benchmark:      exact_match {before:.3f} -> {after:.3f} "
                        "(start model -> exported model)"), lines
    first = check.answers[0]
    assert lines[1].startswith(f"held-out:       {first.prompt} -> {first.answer!r}"), lines
    assert first.prompt.startswith(("sort: ", "reverse: ")) and "<|" not in first.prompt  # as a user types it
    assert sum(line.endswith(" correct") for line in lines[1:]) >= 2, lines


def test_a_wrong_answer_is_shown_with_the_expected_one():
    from orchestrator.workflows.downstream import DownstreamCheck, SampleAnswer

    check = DownstreamCheck(before={}, after={}, answers=[
        SampleAnswer(prompt="sort: 8 4 2 3 7", answer="we we we we", expected="= 2 3 4 7 8 .", correct=False)])
    assert check.lines() == ["held-out:       sort: 8 4 2 3 7 -> 'we we we we' wrong, expected '= 2 3 4 7 8 .'"]
