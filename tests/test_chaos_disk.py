"""Disk faults under training (issue 23, promises 4 and 5): a full disk and a corrupted newest checkpoint.

- A checkpoint write that fails for lack of space (a fault hook: the state file's write raises ENOSPC
  halfway) leaves the previous checkpoint intact, removes the partial one and fails the run with
  DiskFullError naming the folder and the space needed; resuming from the previous one reproduces the
  uninterrupted run.
- A newest checkpoint whose weights were altered after it was written is skipped for the previous good
  one, with a warning naming it and the reason.
Run: `python -m pytest tests/test_chaos_disk.py -q` (about 15 s).
"""

from __future__ import annotations

import errno
import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import trainables.checkpointing as checkpointing
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.checkpointing import DiskFullError, checkpoint_problem, latest_checkpoint
from trainables.entrypoints import run_dpo
from trainables.errors import UserError

RUN = dict(data__max_length=48, dpo__beta=0.1, train__device="cpu", train__learning_rate=5e-3, train__batch_size=4,
           train__max_steps=4, train__warmup_steps=0, train__eval_every=4, train__checkpoint_every=2,
           train__keep_checkpoints=None, train__log_every=1, train__seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("chaos-disk")
    world = {"root": root, "model": str(build_model_dir(root / "model", "llama")),
             "train": str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 16, seed=1))),
             "eval": str(write_jsonl(root / "eval.jsonl", pair_rows("explicit", 4, seed=2)))}
    world["uninterrupted"] = {r["step"]: r for r in train(world, root / "uninterrupted")}
    return world


def train(world: dict[str, Any], output_dir: Path, resume_from: str | None = None) -> list[dict[str, Any]]:
    spec = engine_args(world["model"], world["train"], world["eval"], output_dir=output_dir, train__resume_from=resume_from,
                       reference_cache=Path(world["root"]) / "reference-cache", **RUN)
    reports: list[dict[str, Any]] = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, lambda metrics, checkpoint: reports.append(metrics))
    return reports


def same_as_uninterrupted(world, reports: list[dict[str, Any]]) -> None:
    for report in reports:
        expected = world["uninterrupted"][report["step"]]
        assert abs(report["train/loss"] - expected["train/loss"]) < 1e-6, report["step"]


@pytest.mark.integration
def test_a_checkpoint_write_that_runs_out_of_space_keeps_the_previous_one_and_names_the_path_and_space(world, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_fills_at_step_4(obj, path, *args, **kwargs):  # the fault hook: half the state file, then ENOSPC
        if isinstance(obj, dict) and obj.get("step") == 4:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", disk_fills_at_step_4)
    output_dir = tmp_path / "full-disk"
    with pytest.raises(DiskFullError) as caught:
        train(world, output_dir)
    message = str(caught.value)
    checkpoints = output_dir / "checkpoints"
    print(message)
    assert isinstance(caught.value, UserError)  # `dpo train` exits 2 with this message, no traceback
    assert f"no space left to write checkpoint step-000004 in {checkpoints}" in message
    assert "it needs about" in message and "(the size of step-000002)" in message and "MiB are free" in message
    assert f"the previous checkpoint {checkpoints / 'step-000002'} is intact" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # no staging folder, no step-000004
    assert checkpoint_problem(checkpoints / "step-000002") is None

    monkeypatch.setattr(checkpointing.torch, "save", real_save)  # space freed
    resumed = train(world, output_dir, resume_from="latest")
    assert [r["step"] for r in resumed] == [3, 4]
    same_as_uninterrupted(world, resumed)


@pytest.mark.integration
def test_a_corrupted_newest_checkpoint_is_skipped_for_the_previous_good_one_with_a_warning(world, tmp_path, caplog):
    output_dir = tmp_path / "corrupted"
    train(world, output_dir)
    checkpoints = output_dir / "checkpoints"
    weights = checkpoints / "step-000004" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x20  # one flipped bit in the weights, after the checkpoint was complete
    weights.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="trainables.checkpointing"):
        assert latest_checkpoint(checkpoints) == checkpoints / "step-000002"
    assert "step-000004 is incomplete or corrupt: model/model.safetensors does not match its sha256" in caplog.text

    resumed = train(world, output_dir, resume_from="latest")  # from step 2: steps 3 and 4 again
    assert [r["step"] for r in resumed] == [3, 4]
    same_as_uninterrupted(world, resumed)
    assert checkpoint_problem(checkpoints / "step-000004") is None  # rewritten by the resumed run
