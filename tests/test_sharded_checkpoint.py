"""Checkpoints at scale (issue 19): what a checkpoint restores on a machine that sees other devices.

CUDA RNG state: a checkpoint holds the saving rank's own device's state and restores it onto the current
device, so resuming with fewer visible GPUs works; an older checkpoint's per-device list (one entry per GPU
the saving process saw) is restored from its first entry instead of being indexed by position (which
raised IndexError with fewer GPUs). Simulated on CPU by standing in for torch.cuda's RNG functions.
Run: `python -m pytest tests/test_sharded_checkpoint.py -q`.
"""

from __future__ import annotations

import pytest
import torch

from trainables.checkpointing import restore_rng_state, rng_state


class OneVisibleGpu:
    """torch.cuda's RNG functions as on a worker that sees one GPU (its own)."""

    def __init__(self, monkeypatch):
        self.state = torch.tensor([1, 2, 3], dtype=torch.uint8)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.state.clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.state.clone()])

        def set_all(states):  # torch's own: one state per saved position, device by device
            for index, value in enumerate(states):
                if index >= 1:
                    raise IndexError(f"device {index} is not visible")
                self.set(value)

        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)

    def set(self, value, device="cuda"):
        self.state = value.clone()


def test_cuda_rng_state_is_this_devices_and_restores_with_fewer_visible_gpus(monkeypatch):
    gpu = OneVisibleGpu(monkeypatch)
    saved = rng_state()
    assert torch.equal(saved["cuda"], gpu.state)  # one tensor: this rank's device, not a list over devices
    gpu.state = torch.tensor([9, 9, 9], dtype=torch.uint8)
    restore_rng_state(saved)
    assert gpu.state.tolist() == [1, 2, 3]

    two_gpus = {**saved, "cuda": [torch.tensor([4, 5, 6], dtype=torch.uint8), torch.tensor([7, 8, 9], dtype=torch.uint8)]}
    with pytest.raises(IndexError):  # what restoring by saved position did with one visible GPU
        torch.cuda.set_rng_state_all(two_gpus["cuda"])
    restore_rng_state(two_gpus)  # an older checkpoint of a process that saw 2 GPUs: its own (first) state
    assert gpu.state.tolist() == [4, 5, 6]
