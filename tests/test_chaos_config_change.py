"""Resuming under an edited config (issue 23, promise 7): refused listing the changed keys, unless forced.

`dpo train` is run to its end, then resumed with keys changed: result keys are refused (exit 2, the keys
and both values listed, nothing written); keys that cannot change results (tracking, the grace period)
pass; `--force-config-change` lets result keys pass with a warning. `dpo sweep --resume` is refused the
same way before Ray starts (a sweep may not change train.max_steps; a single run may, to train longer). Run: `python -m pytest tests/test_chaos_config_change.py -q` (about 15 s).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.config import load_config
from orchestrator.config.layout import StorageLayout
from orchestrator.tracking.records import write_config_yaml
from orchestrator.workflows.config_change import NON_RESULT_KEYS, changed_keys, comparable
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("config-change")
    model = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1))
    config = {"name": "edited", "storage_path": str(root / "runs"), "model": {"path": str(model)},
              "data": {"train": str(train), "max_length": 48},
              "train": {"max_steps": 2, "batch_size": 4, "device": "cpu", "learning_rate": 1e-3},
              "reference": {"cache_dir": str(root / "reference-cache")},
              "sweep": {"strategy": "grid", "beta": [0.1]}, "tracking": {"enabled": False}}
    path = root / "config.yaml"
    path.write_text(json.dumps(config))
    return {"root": str(root), "config": str(path)}


def test_only_keys_that_can_change_results_count():
    stored = {"dpo.beta": 0.1, "train.learning_rate": 1e-4, "tracking.uri": "http://a", "train.preemption_grace_s": 60.0,
              "output_dir": "/a", "train.resume_from": None, "data.max_length": 512}
    current = {**stored, "dpo.beta": 0.2, "tracking.uri": "http://b", "train.preemption_grace_s": 5.0, "output_dir": "/b",
               "train.resume_from": "latest", "model.new_key_of_a_newer_version": 1}
    assert changed_keys(stored, current) == {"dpo.beta": (0.1, 0.2)}
    assert {"tracking.uri", "train.resume_from", "failure.max_failures"} <= NON_RESULT_KEYS
    assert "dpo.beta" not in NON_RESULT_KEYS and "train.max_steps" not in NON_RESULT_KEYS


def test_the_comparison_sees_what_the_config_resolves_to_with_secrets_redacted(world):
    config = load_config(world["config"], ["tracking.uri=http://user:pa55@127.0.0.1:5000"])
    values = comparable(config)
    assert values["dpo.beta"] == 0.1 and values["train.learning_rate"] == 1e-3
    assert "pa55" not in json.dumps(values)


@pytest.mark.integration
def test_dpo_train_resumed_with_changed_result_keys_is_refused_listing_them_unless_forced(world, tmp_path, capsys, caplog):
    output = ["--set", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", world["config"], *output]) == 0
    capsys.readouterr()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    resume = [*output, "--set", "train.resume_from=latest"]

    code = main(["train", world["config"], *resume, "--set", "dpo.beta=0.3", "--set", "train.learning_rate=0.01",
                 "--set", "train.preemption_grace_s=5"])
    error = capsys.readouterr().err
    assert code == 2
    assert "differs from the one the run started with" in error and "in 2 key(s)" in error
    assert "dpo.beta: 0.1 -> 0.3" in error and "train.learning_rate: 0.001 -> 0.01" in error
    assert "resuming from step-000002" in error
    assert "preemption_grace_s" not in error and "--force-config-change" in error
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics  # nothing written
    assert not (tmp_path / "run" / "run.lock").exists()

    # keys that cannot change results may change
    assert main(["train", world["config"], *resume, "--set", "train.preemption_grace_s=5",
                 "--set", "reference.cache_dir=" + str(tmp_path / "moved-cache")]) == 0
    with caplog.at_level(logging.WARNING, logger="orchestrator.workflows.config_change"):
        assert main(["train", world["config"], *resume, "--force-config-change", "--set", "dpo.beta=0.3"]) == 0
        # a single run may train longer than first planned, with a warning
        assert main(["train", world["config"], *resume, "--set", "train.max_steps=3"]) == 0
    assert "--force-config-change: resuming with 1 changed key(s) that can change results: dpo.beta: 0.1 -> 0.3" in caplog.text
    assert "train.max_steps changes from 2 to 3" in caplog.text
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_dpo_sweep_resumed_with_a_changed_result_key_is_refused_before_ray_starts(world, capsys, monkeypatch):
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray, "init", forbidden)
    config = load_config(world["config"])
    layout = StorageLayout.of(config.storage_path, config.name)
    Path(layout.root).mkdir(parents=True, exist_ok=True)
    write_config_yaml(layout.config_file, config.model_dump())  # as the first session of the sweep wrote it

    code = main(["sweep", world["config"], "--resume", "--set", "train.max_steps=3", "--set", "sweep.beta=[0.1,0.2]"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "dpo sweep --resume: this config differs" in error
    assert "sweep.beta: [0.1] -> [0.1, 0.2]" in error and "train.max_steps: 2 -> 3" in error

    # a key that cannot change results passes the check: the sweep goes on to start Ray (forbidden here)
    code = main(["sweep", world["config"], "--resume", "--set", "tracking.experiment=another"])
    assert code == 1 and "AssertionError: Ray started" in capsys.readouterr().err
