"""Loading that scales (issue 19): meta-device construction on every rank, weights read by rank 0 only and
broadcast into the FSDP2 shards (trainables/sharding.py: load_sharded).

Two gloo ranks on CPU (torch.multiprocessing) load a 4-layer Llama of 207 MiB (float32) sharded:
- the gathered weights equal a plain from_pretrained; on the tiny Llama of tests/tiny_world.py every buffer
  (rotary inv_freq is built in __init__, outside the state dict) and the logits equal the plain model's;
- the host memory rank 1 gains while loading (its process's RSS, sampled every millisecond, above the RSS
  before loading), less what the same model costs without weights (its modules, DTensors and FSDP state,
  measured by building one more on the meta device: a few MiB, whatever the model's size), stays below its
  shard plus 10% of the model (it includes, for a moment, the one full tensor being broadcast); the raw
  gain stays far below the full model; glibc is told to return freed blocks above 64 KiB
  to the system at once (MALLOC_MMAP_THRESHOLD_), so RSS counts what is held, not what malloc keeps cached;
- with LoRA attached on the meta device, the adapters arrive from rank 0 as well (the same keys and values).
Run: `python -m pytest tests/test_distributed_loading.py -q -s` (prints the figures).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from trainables.host_memory import RETURN_FREED_BLOCKS, PeakRss

WORLD = 2
LAYERS, HIDDEN, INTERMEDIATE, VOCAB = 4, 1024, 2816, 512  # 207 MiB; largest tensor 11 MiB = 5.3%


@pytest.fixture
def wide_model(tmp_path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = tmp_path / "wide-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, safe_serialization=True)
    return directory


def _worker(rank: int, init_file: str, wide_dir: str, tiny_dir: str, out: str) -> None:
    import torch.distributed as dist

    from trainables.modeling import attach_lora, load_causal_lm
    from trainables.sharding import empty_causal_lm, full_model_state, load_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        import torch.distributed.checkpoint.state_dict as _state_dict  # noqa: F401 - imports before the baseline
        import torch.distributed.fsdp as _fsdp  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        def build(path: str, meta: bool, lora: bool = False) -> torch.nn.Module:
            model = empty_causal_lm(path) if meta else load_causal_lm(path)
            if lora:
                torch.manual_seed(7)  # rank 0's adapters are the ones every rank must end with
                model = attach_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
            return model

        def same(expected: dict, got: dict) -> bool:
            return expected.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in expected.items())

        # 1) the wide model: host memory while loading, and the weights
        dist.barrier()
        with PeakRss() as memory:
            model = load_sharded(lambda meta: build(wide_dir, meta), device=torch.device("cpu"))
        report = {"gained": memory.gained,
                  "shard_bytes": sum(p.to_local().numel() * p.element_size() for p in model.parameters())}
        with PeakRss() as structure:  # what a model costs without weights: modules, DTensors, FSDP state
            empty = shard_model(empty_causal_lm(wide_dir), device=torch.device("cpu"))
        report["structure"] = structure.gained
        del empty
        full = full_model_state(model)
        del model
        if rank == 0:
            plain = load_causal_lm(wide_dir).state_dict()
            report["model_bytes"] = sum(v.numel() * v.element_size() for v in plain.values())
            report["weights_equal"] = same(plain, full)
        del full
        # 2) the tiny model: buffers outside the state dict and logits; LoRA attached on the meta device
        model = load_sharded(lambda meta: build(tiny_dir, meta), device=torch.device("cpu"))
        tokens = torch.arange(24).reshape(2, 12) % 16
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        buffers = {name: value.clone() for name, value in model.named_buffers()}
        lora_full = full_model_state(load_sharded(lambda meta: build(tiny_dir, meta, lora=True), device=torch.device("cpu")))
        if rank == 0:
            plain = load_causal_lm(tiny_dir)
            report["buffers_equal"] = same(dict(plain.named_buffers()), buffers)
            report["buffer_names"] = sorted(buffers)
            with torch.no_grad():
                report["logits_max_difference"] = float((plain(input_ids=tokens).logits - logits).abs().max())
            lora_plain = build(tiny_dir, False, lora=True).state_dict()
            report["lora_keys"] = sum("lora_" in key for key in lora_full)
            report["lora_equal"] = same(lora_plain, lora_full)
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_rank_one_holds_its_shard_not_the_model_and_the_weights_equal_a_normal_load(wide_model, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    for name, value in RETURN_FREED_BLOCKS.items():  # read by glibc when each rank's process starts
        monkeypatch.setenv(name, value)
    from tests.tiny_world import build_model_dir

    tiny = build_model_dir(tmp_path / "tiny", "llama")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(wide_model), str(tiny), str(tmp_path)), nprocs=WORLD,
             join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["weights_equal"] and rank0["buffers_equal"], rank0
    assert "model.rotary_emb.inv_freq" in rank0["buffer_names"]  # a buffer outside the state dict, broadcast too
    assert rank0["logits_max_difference"] < 1e-5, rank0
    assert rank0["lora_keys"] > 0 and rank0["lora_equal"], rank0
    model_bytes = rank0["model_bytes"]
    print(f"model {model_bytes / 2**20:.1f} MiB; rank 1 gained {rank1['gained'] / 2**20:.1f} MiB while loading "
          f"(shard {rank1['shard_bytes'] / 2**20:.1f} MiB, the model's structure without weights "
          f"{rank1['structure'] / 2**20:.1f} MiB); rank 0 gained {rank0['gained'] / 2**20:.1f} MiB")
    assert rank1["shard_bytes"] == pytest.approx(model_bytes / WORLD, rel=0.01)
    weights_held = rank1["gained"] - rank1["structure"]
    assert weights_held < rank1["shard_bytes"] + 0.10 * model_bytes, rank1  # its shard plus 10% of the model
    assert rank1["gained"] < 0.75 * model_bytes and rank0["gained"] > model_bytes  # rank 0 alone read it all
