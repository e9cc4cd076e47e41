"""The engine at 4 ranks (issue 19): FSDP and HSDP losses, sharded checkpoints resumed at 2 ranks and 1, export.

The tiny Llama's LM head is tied to its embedding, as in the embedded default. One 4-rank spawn (gloo,
torch.multiprocessing, as tests/test_fsdp.py does) trains two runs of 5 steps: FSDP over the 4 ranks (full
weights), and HSDP as a 2 x 2 mesh (LOCAL_WORLD_SIZE 2, as Ray Train sets it on 2 nodes of 2 workers) with
LoRA. Each writes sharded checkpoints at steps 3 and 5. Step 3 is in the middle of a metric window (log_every 2: steps 3 and 4 are one logged mean), so resuming there
exercises everything a checkpoint carries besides the weights: the Adam moments, the warmup+cosine scheduler,
the data position and the partial window of metric sums, whose per-rank split depends on the world size.

Each step-3 checkpoint is then resumed by one 2-rank spawn and in this process (1 rank); the continued
losses must equal the uninterrupted 4-rank run's within 1e-5, and the 4-rank losses must equal one process's.
The step-5 checkpoints go through `dpo export`'s writer and check (write_weights: consolidated in one
process, LoRA merged; verify_export: loaded with from_pretrained, generating), and the exported model's logits must equal the
trained (still sharded) model's; `dpo plan`'s checkpoint size (trainables/scale_plan.py) must be the tensor
bytes these checkpoints hold. With LoRA the runs must also draw the same initial adapters as one process
(the meta-device build used to consume the generator first), and the LoRA checkpoint must hold only
adapter tensors and their optimizer state.
Run: `python -m pytest tests/test_sharded_resume.py -q --durations=3` (142 to 230 s of setup on 2 cores shared
with other jobs at load average 8-12).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_fsdp import assert_same_metrics, experiment_raw, run_engine
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

# FSDP over 4 ranks with full weights; HSDP (2 x 2) with LoRA. HSDP with full weights would add a third run (a third
# of this module's time) differing from the first only in the mesh, whose checkpoints tests/test_sharded_checkpoint.py
# already loads at other world sizes.
RUNS = {"fsdp": {"hsdp": False, "lora": False}, "hsdp_lora": {"hsdp": True, "lora": True}}
PROBE = [[1, 5, 9, 12, 7, 4, 8, 10], [1, 6, 6, 11, 13, 5, 9, 14]]  # token ids the trained models' logits are read on


def raw_for(root: Path, lora: bool) -> dict[str, Any]:
    """5 steps of 8 pairs with warmup and cosine decay; checkpoints at 3 and 5; a metric window spans steps 3-4."""
    raw = experiment_raw(root)
    raw["train"].update(max_steps=5, log_every=2, checkpoint_every=3, warmup_steps=1)
    if lora:  # a larger learning rate, so that adapters starting at zero move the losses visibly in 5 steps
        raw["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        raw["train"]["learning_rate"] = 2e-2
    return raw


def _logits(model: torch.nn.Module) -> list:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(PROBE)).logits.tolist()


def _mesh(model: torch.nn.Module) -> list[int]:
    """The mesh of the sharded parameters (the root's may be unsharded after a forward without backward)."""
    return list(next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh.shape)


def _rank_worker(rank: int, world: int, init_file: str, root: str, task: str) -> None:
    """task 'train': the two uninterrupted runs at 4 ranks, and each final model's logits on PROBE (computed by
    the sharded model itself, every rank taking part); task 'resume': each run from its step-3 checkpoint."""
    import torch.distributed as dist

    from trainables.sharding import FSDPPreparer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        out, results = Path(root), {}
        for name, kind in RUNS.items():
            # HSDP: 2 "nodes" of 2 ranks at 4 ranks; a 2-rank resume of it runs on one node (1-D mesh)
            os.environ["LOCAL_WORLD_SIZE"] = "2" if kind["hsdp"] and world == 4 else str(world)
            loaded: list[torch.nn.Module] = []

            class Recording(FSDPPreparer):
                def load_sharded(self, build):
                    # the policy first; then the reference of the exact eval/kl, at the first evaluation
                    loaded.append(super().load_sharded(build))
                    return loaded[-1]

            raw = raw_for(out, kind["lora"])
            if task == "train":
                results[name] = {"reports": run_engine(raw, out / name, workers=world, prepare_model=Recording("cpu")),
                                 "mesh": _mesh(loaded[0]),
                                 "logits": _logits(loaded[0])}
            else:
                step3 = str(out / name / "checkpoints" / "step-000003")
                results[name] = {"reports": run_engine(raw, out / f"{name}-resumed-{world}", workers=world,
                                                       resume_from=step3, prepare_model=Recording("cpu"))}
        if rank == 0:
            (out / f"{task}-{world}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, root: Path, task: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(world, str(root / f"rendezvous-{task}-{world}"), str(root), task), nprocs=world, join=True)
    return json.loads((root / f"{task}-{world}.json").read_text())


def tie_embeddings(model_dir: Path) -> None:
    """The tiny Llama with its LM head tied to the embedding, as the embedded default's is: FSDP loading used to
    untie them (the first sharded checkpoint then failed with KeyError in get_state_dict)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """The 4-rank runs, their resumes at 2 ranks and at 1, and one process's uninterrupted runs."""
    root = tmp_path_factory.mktemp("sharded-resume")
    tie_embeddings(build_model_dir(root / "model", "llama"))
    write_jsonl(root / "train.jsonl", pair_rows("explicit", 32, seed=1))
    write_jsonl(root / "eval.jsonl", pair_rows("explicit", 7, seed=2))
    trained = _spawn(4, root, "train")
    resumed_2 = _spawn(2, root, "resume")
    single, resumed_1 = {}, {}
    for lora in (False, True):
        single[lora] = run_engine(raw_for(root, lora), root / f"single-{lora}", workers=1)
    for name, kind in RUNS.items():
        resumed_1[name] = run_engine(raw_for(root, kind["lora"]), root / f"{name}-resumed-1", workers=1,
                                     resume_from=str(root / name / "checkpoints" / "step-000003"))
    return {"root": root, "trained": trained, "resumed_2": resumed_2, "resumed_1": resumed_1, "single": single}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_4_ranks_give_one_process_losses_and_resume_at_2_ranks_and_at_1(runs, name):
    trained = runs["trained"][name]
    assert [r["step"] for r in trained["reports"]] == [1, 2, 3, 4, 5]
    assert trained["mesh"] == ([2, 2] if RUNS[name]["hsdp"] else [4]), trained["mesh"]
    single = runs["single"][RUNS[name]["lora"]]
    assert single[-1]["train/loss"] < single[0]["train/loss"] - 0.005  # the 5 steps really trained
    assert_same_metrics(trained["reports"], single, f"{name} on 4 ranks")
    manifest = json.loads((runs["root"] / name / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["format"] == "sharded" and manifest["world_size"] == 4
    for label, resumed in (("2 ranks", runs["resumed_2"][name]["reports"]), ("1 process", runs["resumed_1"][name])):
        assert [r["step"] for r in resumed] == [4, 5], label
        # step 4 logs the window of steps 3 and 4: step 3's sums came from the 4-rank checkpoint
        assert "train/loss" in resumed[0] and "eval/loss" in resumed[0], label
        assert_same_metrics(resumed, trained["reports"], f"{name}: the 4-rank checkpoint of step 3 resumed on {label}")


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_dpo_export_of_a_4_rank_checkpoint_gives_the_trained_models_logits(runs, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from orchestrator.workflows.export import verify_export, write_weights

    checkpoint = runs["root"] / name / "checkpoints" / "step-000005"
    out = tmp_path / "exported"  # what `dpo export` writes, less the card and lineage of a sweep's MLflow run
    lora = write_weights(checkpoint, out, base_model=str(runs["root"] / "model"), include_adapter=False)
    assert lora == RUNS[name]["lora"] and isinstance(verify_export(out), str)
    exported = AutoModelForCausalLM.from_pretrained(out)
    difference = (torch.tensor(_logits(exported)) - torch.tensor(runs["trained"][name]["logits"])).abs().max()
    assert float(difference) < 1e-5, (name, float(difference))


@pytest.mark.integration
def test_a_lora_checkpoint_holds_only_adapters_and_their_optimizer_state(runs):
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = runs["root"] / "hsdp_lora" / "checkpoints" / "step-000003"
    keys = list(FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    optimizer_keys = [k for k in keys if k.startswith("optimizer.state.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys
    assert optimizer_keys and all("lora_" in k for k in optimizer_keys), optimizer_keys
    assert {k.rsplit(".", 1)[-1] for k in optimizer_keys} == {"step", "exp_avg", "exp_avg_sq"}
    assert set(keys) == set(model_keys) | set(optimizer_keys) | {k for k in keys if k.startswith("optimizer.param_groups.")}
    assert (checkpoint / "model" / "adapter_config.json").is_file() and not list((checkpoint / "model").glob("*.safetensors"))


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_dpo_plans_checkpoint_bytes_are_the_tensor_bytes_of_the_real_checkpoint(runs, name):
    """trainables/scale_plan.py's checkpoint size (what `dpo plan` prints) against the tensors this engine wrote."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from trainables.memory_plan import TrainingSetup, plan_memory, read_model_shape
    from trainables.scale_plan import plan_scale

    lora = RUNS[name]["lora"]
    setup = TrainingSetup(strategy="fsdp", num_workers=4, micro_batch_pairs=2, seq_len=48, compute="fp32",
                          lora_rank=4 if lora else None, lora_targets=("q_proj", "v_proj"))
    shape = read_model_shape(str(runs["root"] / "model"))
    planned = plan_scale(shape, setup, trained=plan_memory(shape, setup).trained_parameters, storage_gbps=1.0)
    metadata = FileSystemReader(str(runs["root"] / name / "checkpoints" / "step-000003" / "sharded")).read_metadata()
    written = sum(item.size.numel() * torch.empty((), dtype=item.properties.dtype).element_size()
                  for key, item in metadata.state_dict_metadata.items()
                  if isinstance(item, TensorStorageMetadata) and not key.endswith(".step"))  # AdamW's step counters
    assert planned.sharded_checkpoint and planned.writers == 4
    assert planned.checkpoint_bytes == written, (name, planned.checkpoint_bytes, written)
