"""A reference cache damaged while a sweep's trials run (issue 23, promise 4): found by its hash, recomputed once.

The cache of the tiny world is written, then damaged two ways: one value altered (finite, so only the
content hash shows it) and the file truncated. Three "trials" (threads: each takes the lock file through
its own file description, as separate processes do) then load it at the same moment: the reference model
is loaded and run once, and every trial gets the original values.
Run: `python -m pytest tests/test_chaos_cache.py -q` (a few seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.entrypoints import load_preference_data
from trainables.modeling import load_causal_lm
from trainables.reference_cache import (CONTENT_HASH_KEY, UnusableCache, cache_path, load_or_compute_reference_logps,
                                        read_cache)

TRIALS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-cache")
    model = str(build_model_dir(root / "model", "llama"))
    spec = engine_args(model, str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1))), data__max_length=48)
    data = load_preference_data(spec.model, spec.data)
    return {"model": model, "pairs": list(data.train), "pad": data.tokenizer.pad_token_id}


def load(world, cache_dir: Path, calls: list[float]):
    def load_reference_model():
        calls.append(time.monotonic())
        time.sleep(0.5)  # a slow reference model: the other trials are waiting meanwhile
        return load_causal_lm(world["model"])

    return load_or_compute_reference_logps(cache_dir=cache_dir, fingerprint="f" * 16, pairs=world["pairs"],
                                           load_reference_model=load_reference_model, pad_token_id=world["pad"],
                                           batch_size=4, device=torch.device("cpu"), autocast_dtype=None, show_progress=False)


def altered(path: Path) -> None:
    """One finite value changed, the header (fingerprint and content hash) kept: only the hash can tell."""
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["chosen_logps"][0] += 0.25
    save_file(tensors, str(path), metadata=metadata)


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("damage", [altered, truncated], ids=["altered value", "truncated"])
def test_a_damaged_reference_cache_is_found_and_recomputed_once_for_all_trials(world, tmp_path, damage, caplog):
    first_calls: list[float] = []
    original, reused = load(world, tmp_path, first_calls)
    assert not reused and len(first_calls) == 1
    path = cache_path(tmp_path, "f" * 16)
    with safe_open(str(path), "pt") as handle:
        assert len(handle.metadata()[CONTENT_HASH_KEY]) == 64

    damage(path)
    with pytest.raises(UnusableCache):
        read_cache(path, "f" * 16, world["pairs"])

    calls: list[float] = []
    results: list = [None] * TRIALS
    def trial(index: int) -> None:
        results[index] = load(world, tmp_path, calls)

    with caplog.at_level(logging.WARNING, logger="trainables.reference_cache"):
        threads = [threading.Thread(target=trial, args=(index,)) for index in range(TRIALS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert len(calls) == 1, f"the reference model ran {len(calls)} times"
    assert sorted(reused for _, reused in results) == [False] + [True] * (TRIALS - 1)
    for values, _ in results:
        for name, tensor in original.tensors().items():
            assert torch.equal(values.tensors()[name], tensor), name
    assert f"reference cache {path} is unusable" in caplog.text
    read_cache(path, "f" * 16, world["pairs"])  # the rewritten file is sound
