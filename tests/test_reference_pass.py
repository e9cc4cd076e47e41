"""The reference pass at scale (issue 19): computed by as many workers as a trial has, each writing its slice.

- The parts of the pass, computed separately and joined, give the values one process computes (the pass
  batches each slice by its own lengths, so equal within float32 rounding, not bit for bit).
- A finished part file is reused: a pass stopped half-way does not recompute what it wrote.
- On a local Ray, a sweep's reference task for a trial of 2 workers runs 2 part tasks in 2 processes, and
  leaves one cache file that a trial reads as if one process had written it.
- A trial's wait for the pass is bounded: ReferenceWaitTimeout names reference.wait_timeout_s.
Run: `python -m pytest tests/test_reference_pass.py -q` (about 20 s).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.entrypoints import load_preference_data, precompute_reference
from trainables.modeling import load_causal_lm
from trainables.reference_cache import (cache_path, compute_reference_logps, concat_reference_logps,
                                        load_or_compute_part, part_path, read_cache, slice_bounds)

TOLERANCE = 1e-5  # float32 log-probs of the same pairs, batched differently


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-pass")
    model = str(build_model_dir(root / "model", "llama"))
    spec = engine_args(model, str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 11, seed=3))),
                       str(write_jsonl(root / "eval.jsonl", pair_rows("explicit", 4, seed=4))), data__max_length=48,
                       reference_cache=root / "one-process")
    data = load_preference_data(spec.model, spec.data)
    train, held_out, key, _ = precompute_reference(spec.model, spec.preference, data, spec.runtime)
    whole = read_cache(cache_path(root / "one-process", key), key, list(data.train) + list(data.eval))
    return {"root": root, "model": model, "spec": spec, "data": data, "key": key, "whole": whole,
            "pairs": list(data.train) + list(data.eval)}


def assert_same_values(got, expected) -> None:
    for name, value in expected.tensors().items():
        other = got.tensors()[name]
        assert other.shape == value.shape and other.dtype == value.dtype, name
        if value.is_floating_point():
            assert torch.allclose(other, value, atol=TOLERANCE, rtol=0), name
        else:
            assert torch.equal(other, value), name


def test_slices_cover_every_pair_once_in_order():
    assert slice_bounds(15, 4) == [(0, 3), (3, 7), (7, 11), (11, 15)]
    assert slice_bounds(2, 3) == [(0, 0), (0, 1), (1, 2)]  # more workers than pairs: an empty slice is fine


def test_parts_joined_equal_one_process_and_a_finished_part_is_reused(world, tmp_path):
    model = load_causal_lm(world["model"])
    computed: list[int] = []

    def compute(pairs):
        computed.append(len(pairs))
        return compute_reference_logps(model, pairs, pad_token_id=world["data"].tokenizer.pad_token_id, batch_size=3,
                                       device=torch.device("cpu"), show_progress=False)

    parts = [load_or_compute_part(tmp_path, "k" * 20, world["pairs"], index, 3, compute) for index in range(3)]
    assert computed == [5, 5, 5] and not any(reused for _, reused in parts)
    assert all(part_path(tmp_path, "k" * 20, index, 3).is_file() for index in range(3))
    assert_same_values(concat_reference_logps([values for values, _ in parts]), world["whole"])

    computed.clear()  # the pass again, as after a crash: the parts on disk are read, not recomputed
    again = load_or_compute_part(tmp_path, "k" * 20, world["pairs"], 1, 3, compute)
    assert again[1] and computed == []
    assert_same_values(again[0], parts[1][0])


@pytest.mark.ray
def test_a_two_worker_trial_gets_a_pass_over_two_processes_and_one_cache_file(world, tmp_path):
    import ray

    from orchestrator.ray.reference_task import ReferenceTask, ReferenceWaitTimeout, wait_for_reference

    cache_dir = tmp_path / "cache"
    spec = world["spec"]
    spec = replace(spec, preference=replace(spec.preference, reference_cache_dir=str(cache_dir)),
                   resources=replace(spec.resources, num_workers=2, cpus_per_worker=1, use_gpu=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        task = ReferenceTask(spec, ray.put(world["data"]))
        key, reused, workers = ray.get(task.ref)
        assert (key, reused, workers) == (world["key"], False, 2)
        assert [path.name for path in cache_dir.iterdir() if path.suffix == ".safetensors"] == [cache_path(cache_dir, key).name]
        assert_same_values(read_cache(cache_path(cache_dir, key), key, world["pairs"]), world["whole"])
        assert ray.get(ReferenceTask(spec, ray.put(world["data"])).ref)[:2] == (key, True)  # the next sweep reuses it

        never = ray.remote(lambda: __import__("time").sleep(60)).remote()
        with pytest.raises(ReferenceWaitTimeout, match="reference.wait_timeout_s"):
            wait_for_reference(never, 0.5, "this trial", log_every_s=0.2)
        ray.cancel(never, force=True)
    finally:
        ray.shutdown()
