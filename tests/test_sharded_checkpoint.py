"""Checkpoints at scale (issue 19): what a checkpoint restores on a machine that sees other devices.

CUDA RNG state: a checkpoint holds the saving rank's own device's state and restores it onto the current
device, so resuming with fewer visible GPUs works; an older checkpoint's per-device list (one entry per GPU
the saving process saw) is restored from its first entry instead of being indexed by position (which
raised IndexError with fewer GPUs). Simulated on CPU by standing in for torch.cuda's RNG functions.

Sharded checkpoints (trainables/sharded_checkpoint.py: save_sharded_checkpoint, load_sharded_state): a tiny Llama
on 2 gloo ranks takes one AdamW step and saves, full and with LoRA; each rank wrote and hashed its own shard
file; loaded in one process (no process group) and on 4 ranks as HSDP (2 x 2), weights and Adam state equal
the saved ones within 1e-6, and the HSDP world's own checkpoint loads in one process; the LoRA checkpoint
holds adapter tensors only; `dpo export`'s write_weights and a study's checkpoint_model_dir consolidate it into a Hugging Face folder whose logits equal the loaded model's; an
altered byte in rank 1's shard is refused by all 4 ranks (their shared hash check), a truncated one by the
manifest.
Run: `python -m pytest tests/test_sharded_checkpoint.py -q` (about 1 minute on 2 busy CPU cores).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.tiny_world import build_model_dir

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


# ---- sharded checkpoints: torch.distributed.checkpoint, each rank writes and hashes its own shards ----

LORA_TARGETS = ["q_proj", "v_proj"]


def _build(model_dir: str, lora: bool):
    from trainables.modeling import attach_lora, load_causal_lm
    from trainables.sharding import empty_causal_lm

    def build(meta: bool):
        model = empty_causal_lm(model_dir) if meta else load_causal_lm(model_dir)
        if lora:
            torch.manual_seed(1)
            model = attach_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
            for name, parameter in model.named_parameters():  # lora_B starts at 0: make the adapters non-trivial
                if "lora_B" in name and not parameter.is_meta:
                    torch.nn.init.normal_(parameter, std=0.1)
        return model

    return build


def _step(model, optimizer, rank: int, world: int) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(4, 16, (4, 10))  # the global batch; each rank takes its rows
    mine = tokens[rank::world]
    model(input_ids=mine, labels=mine).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _full_state(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    from trainables.sharding import full_model_state, full_optimizer_state

    if sharded:
        return full_model_state(model), full_optimizer_state(optimizer)
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer.state_dict())


def _worst(expected: tuple[dict, dict], got: tuple[dict, dict], trainable: set[str]) -> float:
    """The largest difference between two (model, optimizer) full states over the trained tensors."""
    (model_a, optim_a), (model_b, optim_b) = expected, got
    assert set(model_a) == set(model_b)
    worst = max(float((model_a[k] - model_b[k]).abs().max()) for k in trainable)
    assert set(optim_a["state"]) == set(optim_b["state"]) and optim_a["state"], "optimizer states differ in keys"
    for index, per_parameter in optim_a["state"].items():
        for name, value in per_parameter.items():
            worst = max(worst, float((torch.as_tensor(value) - torch.as_tensor(optim_b["state"][index][name])).abs().max()))
    return worst


def _world_worker(rank: int, world: int, init_file: str, model_dir: str, root: str, mode: str) -> None:
    """mode save: one AdamW step, then save_sharded_checkpoint (full model, and LoRA); rank 0 keeps the full state.
    mode load: fresh models and optimizers, load_sharded_state, rank 0 compares the full state with the saved one;
    with 4 ranks as HSDP (2 x 2, LOCAL_WORLD_SIZE 2 as Ray Train sets it on 2 nodes), which then saves the full
    model again (an HSDP checkpoint, loaded by the test in one process)."""
    import os

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from trainables.sharded_checkpoint import load_sharded_state, save_sharded_checkpoint
    from trainables.loop import build_optimizer
    from trainables.sharding import FSDPPreparer

    torch.set_num_threads(1)
    if mode == "load" and world == 4:
        os.environ["LOCAL_WORLD_SIZE"] = "2"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        out = Path(root)
        results = {}
        for lora in (False, True):
            kind = "lora" if lora else "full"
            model = FSDPPreparer(torch.device("cpu")).load_sharded(_build(model_dir, lora))
            optimizer = build_optimizer(model, 1e-2, 0.01)
            if mode == "save":
                _step(model, optimizer, rank, world)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
                saved = save_sharded_checkpoint(
                    out / kind / "checkpoints", 1, model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                    optimizer=optimizer, scheduler=scheduler, pairs_consumed=4,
                    extra={"lineage": {"run_id": f"run-{kind}"}})
                state = _full_state(model, optimizer, True)
                if rank == 0:
                    torch.save(state, out / kind / "expected.pt")
                    results[kind] = str(saved)
            else:
                load_sharded_state(out / kind / "checkpoints" / "step-000001", model, optimizer)
                state = _full_state(model, optimizer, True)
                if rank == 0:
                    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                    results[kind] = _worst(torch.load(out / kind / "expected.pt", weights_only=True), state, trainable)
                if not lora and world == 4:  # saved from the HSDP mesh: parameters replicated over 2 x sharded over 2
                    results["mesh"] = list(next(model.parameters()).device_mesh.shape)
                    save_sharded_checkpoint(out / "hsdp" / "checkpoints", 1, model=model,
                                            tokenizer=AutoTokenizer.from_pretrained(model_dir), optimizer=optimizer,
                                            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                                            pairs_consumed=4)
                if not lora:  # one byte of rank 1's shard altered (same size): the ranks' shared hash check refuses it
                    from trainables.checkpointing import CheckpointError, checkpoint_problem

                    target = out / kind / "checkpoints" / "step-000001"
                    dist.barrier()
                    if rank == 0:
                        shard = target / "sharded" / "__1_0.distcp"
                        data = bytearray(shard.read_bytes())
                        data[len(data) // 2] ^= 0xFF
                        shard.write_bytes(bytes(data))
                    dist.barrier()
                    sizes_only = checkpoint_problem(target) is None  # in a world: shard sizes, no rank hashes them all
                    try:
                        load_sharded_state(target, model, optimizer)
                        refused = "loaded"
                    except CheckpointError as error:
                        refused = "__1_0.distcp" in str(error) and sizes_only
                    every = [None] * world
                    dist.all_gather_object(every, refused)
                    results["altered_shard_refused_by_every_rank"] = every
        if rank == 0:
            (out / f"{mode}-{world}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path, model_dir: Path, mode: str) -> dict:
    import torch.multiprocessing as mp

    mp.spawn(_world_worker, args=(world, str(tmp_path / f"rendezvous-{mode}-{world}"), str(model_dir), str(tmp_path), mode),
             nprocs=world, join=True)
    return json.loads((tmp_path / f"{mode}-{world}.json").read_text())


@pytest.mark.integration
def test_a_sharded_checkpoint_saved_on_2_ranks_resumes_on_1_and_on_4_ranks_and_hsdp(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from trainables.checkpointing import (MANIFEST, checkpoint_problem, is_sharded_checkpoint, latest_checkpoint,
                                          load_training_state)
    from trainables.sharded_checkpoint import load_sharded_state
    from trainables.loop import build_optimizer

    model_dir = build_model_dir(tmp_path / "model", "llama")
    saved = _spawn(2, tmp_path, model_dir, "save")
    checkpoint = Path(saved["full"])
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert manifest["format"] == "sharded" and manifest["world_size"] == 2
    # each rank hashed the shard file it wrote; rank 0 also the metadata, config, tokenizer and training state
    assert manifest["ranks"]["1"] == ["sharded/__1_0.distcp"], manifest["ranks"]
    assert "sharded/__0_0.distcp" in manifest["ranks"]["0"] and "sharded/.metadata" in manifest["ranks"]["0"]
    assert not any(name.endswith(".safetensors") for name in manifest["files"])  # no gathered full weights
    assert not list(checkpoint.parent.glob(".staging-*"))
    assert is_sharded_checkpoint(checkpoint) and latest_checkpoint(checkpoint.parent) == checkpoint
    state = load_training_state(checkpoint)
    assert state["optimizer"] is None and state["sharded_checkpoint"] == str(checkpoint) and state["step"] == 1

    # LoRA + FSDP: the checkpoint holds only the adapters and their optimizer state
    lora_keys = list(FileSystemReader(str(Path(saved["lora"]) / "sharded")).read_metadata().state_dict_metadata)
    model_keys = [k for k in lora_keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys
    assert all("lora_" in k for k in lora_keys if k.startswith("optimizer.state.")), lora_keys
    assert (Path(saved["lora"]) / "model" / "adapter_config.json").is_file()

    # 1 rank, no process group: plain model and optimizer
    for kind in ("full", "lora"):
        model = _build(str(model_dir), kind == "lora")(False)
        optimizer = build_optimizer(model, 1e-2, 0.01)
        load_sharded_state(tmp_path / kind / "checkpoints" / "step-000001", model, optimizer)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        worst = _worst(torch.load(tmp_path / kind / "expected.pt", weights_only=True), _full_state(model, optimizer, False), trainable)
        assert worst <= 1e-6, (kind, worst)

        # dpo export's write_weights consolidates it into a Hugging Face directory (LoRA merged, adapter beside it)
        from transformers import AutoModelForCausalLM

        from orchestrator.workflows.export import write_weights

        exported = tmp_path / f"export-{kind}"
        assert write_weights(tmp_path / kind / "checkpoints" / "step-000001", exported, base_model=str(model_dir),
                             include_adapter=True) == (kind == "lora")
        reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
        tokens = torch.randint(4, 16, (2, 10), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            difference = float((reloaded(input_ids=tokens).logits - model.eval()(input_ids=tokens).logits).abs().max())
        assert difference < 1e-5, (kind, difference)
        assert (exported / "tokenizer_config.json").is_file() and (exported / "model.safetensors").is_file()
        assert (exported / "adapter" / "adapter_model.safetensors").is_file() == (kind == "lora")
        # a study's next stage takes the model folder of a job's checkpoint: consolidated the same way
        from orchestrator.ray.jobs import checkpoint_model_dir

        stage_model = checkpoint_model_dir(tmp_path / kind / "checkpoints" / "step-000001")
        assert stage_model.endswith("consolidated") and checkpoint_problem(Path(stage_model).parent) is None
        with torch.no_grad():
            stage_logits = AutoModelForCausalLM.from_pretrained(stage_model)(input_ids=tokens).logits
        assert float((stage_logits - model(input_ids=tokens).logits).abs().max()) < 1e-5

    # 4 ranks
    loaded = _spawn(4, tmp_path, model_dir, "load")
    assert loaded["full"] <= 1e-6 and loaded["lora"] <= 1e-6, loaded
    assert loaded["altered_shard_refused_by_every_rank"] == [True] * 4, loaded
    assert loaded["mesh"] == [2, 2], loaded  # loaded into HSDP; its own checkpoint loads in one process:
    model = _build(str(model_dir), False)(False)
    optimizer = build_optimizer(model, 1e-2, 0.01)
    load_sharded_state(tmp_path / "hsdp" / "checkpoints" / "step-000001", model, optimizer)
    worst = _worst(torch.load(tmp_path / "full" / "expected.pt", weights_only=True), _full_state(model, optimizer, False),
                   {n for n, p in model.named_parameters()})
    assert worst <= 1e-6, worst
    assert "__1_0.distcp" in checkpoint_problem(checkpoint)  # one process hashes every file

    # a damaged shard of rank 1 is caught by the manifest
    shard = checkpoint / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    assert "__1_0.distcp" in checkpoint_problem(checkpoint)
