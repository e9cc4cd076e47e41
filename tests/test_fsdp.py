"""FSDP (`resources.strategy: fsdp`, trainables/sharding.py) on CPU with gloo: equivalence, checkpoints, resume.

Two FSDP ranks with the global batch of one process must give that process's losses (CPU float32, 1e-5),
with gradient accumulation, active gradient clipping and held-out evaluation split unevenly over the
ranks (7 pairs, batches of 3: rank 0 runs two eval forwards, rank 1 one, so the lockstep padding is
needed or the run hangs). FSDP checkpoints are sharded (torch.distributed.checkpoint, one file per rank,
trainables/sharded_checkpoint.py): loaded into one process they hold the weights gathered from the shards and
one process's weights and optimizer state, and resuming under FSDP, from an FSDP or a single-process
checkpoint, and in one process from the FSDP checkpoint, continues the uninterrupted losses. One test runs the engine in 2 processes (torch.multiprocessing, gloo), loading the
policy sharded (rank 0 reads the weights, trainables/sharding.py: FSDPPreparer), one runs a trial's
TorchTrainer on a local Ray with 2 workers (orchestrator/ray/trial.py's FSDP path). Communication (issue
19): with 2 micro-batches per step, gradients are reduced once per step (FSDP reduce-scatters and DDP
buckets counted on 2 gloo ranks, same gradients), and a micro-batch reads its metrics from the device once.
Run: `python -m pytest tests/test_fsdp.py -q --durations=5` (about 1.5 minutes on 2 busy CPU cores).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.spec import resolve_run
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

TOLERANCE = 1e-5  # CPU float32: 2 FSDP ranks vs 1 process, same global batch
MAX_GRAD_NORM = 0.05  # below every step's gradient norm here, so clipping is always active
COMPARED = ["train/loss", "train/preference_loss", "train/kl", "train/grad_norm", "train/reward_margin",
            "train/logp_chosen", "eval/loss", "eval/preference_accuracy", "eval/reward_margin"]


def experiment_raw(root: Path) -> dict[str, Any]:
    """4 steps of 8 pairs (2 micro-batches of 2 per rank), eval every 2 steps, a checkpoint every step."""
    return {
        "name": "fsdp", "output_dir": str(root / "outputs"), "storage_path": str(root / "runs"),
        "model": {"path": str(root / "model")},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 48},
        "dpo": {"beta": 0.1, "kl_weight": 0.5},
        "train": {"learning_rate": 5e-3, "batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "warmup_steps": 0,
                  "log_every": 1, "eval_every": 2, "checkpoint_every": 1, "eval_batch_size": 3,
                  "max_grad_norm": MAX_GRAD_NORM, "keep_checkpoints": None, "device": "cpu", "precision": "fp32"},
        "reference": {"cache_dir": str(root / "reference-cache")},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "strategy": "fsdp"},
        "tracking": {"enabled": False},
    }


def run_engine(raw: dict[str, Any], output_dir: Path, *, workers: int, resume_from: str | None = None,
               prepare_model=None) -> list[dict[str, Any]]:
    """run_dpo as a worker runs it; returns what it reported (rank 0's view)."""
    from trainables.entrypoints import run_dpo

    config = ExperimentConfig.model_validate(raw)
    spec = resolve_run(config, workers=workers, output_dir=str(output_dir), show_progress=False)
    runtime = replace(spec.runtime, resume_from=resume_from)
    reports: list[dict[str, Any]] = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, runtime,
            lambda metrics, checkpoint: reports.append({**metrics, "checkpoint": checkpoint}),
            prepare_model=prepare_model)
    return reports


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """The tiny Llama, 32 training pairs, 7 held-out pairs, and one process's run of the experiment."""
    root = tmp_path_factory.mktemp("fsdp-world")
    build_model_dir(root / "model", "llama")
    write_jsonl(root / "train.jsonl", pair_rows("explicit", 32, seed=1))
    write_jsonl(root / "eval.jsonl", pair_rows("explicit", 7, seed=2))
    raw = experiment_raw(root)
    single = run_engine(raw, root / "single", workers=1)
    assert [r["step"] for r in single] == [1, 2, 3, 4]
    assert single[-1]["train/loss"] < single[0]["train/loss"] - 0.01  # the steps really trained
    assert single[-1]["train/kl"] > 0  # so the KL term is compared too
    assert all(r["train/grad_norm"] > MAX_GRAD_NORM for r in single)  # clipping acts on every step
    return {"root": root, "raw": raw, "single": single, "single_checkpoints": root / "single" / "checkpoints"}


def compared_keys(record: dict[str, Any]) -> set[str]:
    """The compared metrics a record holds (Ray's metrics_dataframe gives NaN for keys of other steps)."""
    return {k for k in COMPARED if k in record and not (isinstance(record[k], float) and math.isnan(record[k]))}


def assert_same_metrics(got: list[dict[str, Any]], expected: list[dict[str, Any]], what: str) -> None:
    expected_by_step = {r["step"]: r for r in expected}
    assert got, f"{what}: nothing reported"
    for record in got:
        reference = expected_by_step[record["step"]]
        assert compared_keys(record) == compared_keys(reference), f"{what}, step {record['step']}"
        for key in compared_keys(reference):
            assert math.isclose(record[key], reference[key], abs_tol=TOLERANCE), (
                f"{what}, step {record['step']} {key}: {record[key]!r} vs one process {reference[key]!r}")


def consolidated(checkpoint: Path, like: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A sharded checkpoint's (weights, optimizer state) loaded into one process's model (built from `like`'s
    config) and AdamW, with no process group (trainables/sharded_checkpoint.py: load_sharded_state)."""
    from transformers import AutoModelForCausalLM

    from trainables.sharded_checkpoint import load_sharded_state
    from trainables.loop import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(like / "model")
    optimizer = build_optimizer(model, 1.0, 0.0)
    load_sharded_state(checkpoint, model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def assert_checkpoints_match(fsdp: Path, single: Path) -> None:
    """FSDP's is sharded (no HF weights, a torch.distributed.checkpoint per rank); loaded into one process it
    holds (up to float32 reduction order) the same weights and optimizer state as one process's checkpoint."""
    from transformers import AutoModelForCausalLM

    from trainables.checkpointing import is_sharded_checkpoint

    assert is_sharded_checkpoint(fsdp) and not is_sharded_checkpoint(single)
    assert sorted((fsdp / "sharded").iterdir()) == [fsdp / "sharded" / n for n in (".metadata", "__0_0.distcp", "__1_0.distcp")]
    assert not list((fsdp / "model").glob("*.safetensors")) and (fsdp / "model" / "config.json").is_file()
    fsdp_weights, fsdp_optimizer = consolidated(fsdp, single)
    single_weights = AutoModelForCausalLM.from_pretrained(single / "model").state_dict()
    assert fsdp_weights.keys() == single_weights.keys()
    for key, value in single_weights.items():
        assert fsdp_weights[key].shape == value.shape, key  # full tensors, not shards
        assert torch.allclose(fsdp_weights[key], value, atol=TOLERANCE, rtol=0), key
    fsdp_state = torch.load(fsdp / "training_state.pt", weights_only=True)
    single_state = torch.load(single / "training_state.pt", weights_only=True)
    assert fsdp_state["step"] == single_state["step"] and fsdp_state["scheduler"] == single_state["scheduler"]
    single_optimizer = single_state["optimizer"]
    # initial_lr: set by the loop's LambdaLR on the optimizer; `consolidated` builds no scheduler (resume restores it)
    strip = lambda groups: [{k: v for k, v in g.items() if k not in ("fused", "foreach", "initial_lr")} for g in groups]
    assert strip(fsdp_optimizer["param_groups"]) == strip(single_optimizer["param_groups"])
    assert fsdp_optimizer["state"].keys() == single_optimizer["state"].keys()
    for index, per_parameter in single_optimizer["state"].items():
        for name, value in per_parameter.items():
            assert fsdp_optimizer["state"][index][name].shape == value.shape, (index, name)
            assert torch.allclose(fsdp_optimizer["state"][index][name].float(), value.float(), atol=1e-7, rtol=1e-4), (index, name)


# ---- the engine on 2 gloo ranks (torch.multiprocessing) --------------------------------------------

def _fsdp_worker(rank: int, world_size: int, init_file: str, raw: dict[str, Any], root: str, single_step2: str) -> None:
    """One rank: an uninterrupted FSDP run, then two resumed ones; rank 0 writes what each reported."""
    import torch.distributed as dist

    from trainables.sharding import FSDPPreparer, full_model_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))  # a missed collective fails instead of hanging
    try:
        sharded: list[torch.nn.Module] = []

        class Recording(FSDPPreparer):  # what a Ray Train worker uses: rank 0 reads weights, the others get shards
            def load_sharded(self, build):
                sharded.append(super().load_sharded(build))
                return sharded[-1]

        prepare = Recording(torch.device("cpu"))

        out = Path(root)
        results = {"straight": run_engine(raw, out / "straight", workers=world_size, prepare_model=prepare)}
        # the policy, loaded first (the exact eval/kl's reference is loaded sharded at the first evaluation);
        # every rank takes part, rank 0 gets the full weights
        gathered = full_model_state(sharded[0])
        if rank == 0:  # compared by the test with the sharded step-4 checkpoint loaded in one process
            torch.save(gathered, out / "gathered.pt")
        step2 = str(out / "straight" / "checkpoints" / "step-000002")
        results["resumed"] = run_engine(raw, out / "resumed", workers=world_size, resume_from=step2, prepare_model=prepare)
        results["from_single"] = run_engine(raw, out / "from-single", workers=world_size, resume_from=single_step2,
                                            prepare_model=prepare)
        if rank == 0:
            (out / "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_fsdp_ranks_match_one_process_checkpoint_full_state_and_resume(world, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "rendezvous"), world["raw"], str(tmp_path),
                                 str(world["single_checkpoints"] / "step-000002")), nprocs=2, join=True)
    results = json.loads((tmp_path / "results.json").read_text())

    straight = results["straight"]
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert_same_metrics(straight, world["single"], "2 FSDP ranks")
    for step in (2, 4):
        assert_checkpoints_match(tmp_path / "straight" / "checkpoints" / f"step-{step:06d}",
                                 world["single_checkpoints"] / f"step-{step:06d}")
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)  # the trained shards, gathered
    saved, _ = consolidated(tmp_path / "straight" / "checkpoints" / "step-000004", world["single_checkpoints"] / "step-000004")
    assert saved.keys() == gathered.keys() and all(torch.equal(v, gathered[k]) for k, v in saved.items())
    # the 2-rank sharded checkpoint resumed by one process continues the 2-rank losses
    results["one_from_sharded"] = run_engine(world["raw"], tmp_path / "one-from-sharded", workers=1,
                                             resume_from=str(tmp_path / "straight" / "checkpoints" / "step-000002"))
    for name in ("resumed", "from_single", "one_from_sharded"):  # from an FSDP checkpoint, a single process's
        assert [r["step"] for r in results[name]] == [3, 4], name
        assert_same_metrics(results[name], straight, f"FSDP resumed ({name})")


# ---- a trial's TorchTrainer on Ray ------------------------------------------------------------------

@pytest.fixture
def local_ray():
    """Stops the Ray this test starts, even when the test fails."""
    import ray

    yield
    ray.shutdown()


@pytest.mark.ray
def test_a_trial_with_two_fsdp_workers_on_ray_gives_the_losses_of_one_process(world, tmp_path, local_ray):
    """orchestrator.ray.trial.train_worker with strategy fsdp: Ray's gloo group, our sharding, Ray checkpoints."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.config.spec import resolve_experiment
    from orchestrator.ray.cluster import start_ray
    from orchestrator.ray.trial import WorkerJob, train_worker

    spec = resolve_experiment(ExperimentConfig.model_validate(world["raw"])).run  # a sweep's trials' run spec
    start_ray(None, spec.resources)  # 127.0.0.1, this machine's CPUs
    trainer = TorchTrainer(  # what run_trial builds, without the Tune wrapper
        train_worker,
        train_loop_config={"job": WorkerJob(spec=spec)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="fsdp-workers", storage_path=str(tmp_path / "train-runs"),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    records = result.metrics_dataframe.sort_values("step").to_dict("records")
    assert [row["step"] for row in records] == [1, 2, 3, 4]
    assert_same_metrics(records, world["single"], "Ray trial, 2 FSDP workers")
    with result.checkpoint.as_directory() as final:
        # The workers really sharded (Ray's own prepare_model would have given DDP): the checkpoint is the sharded
        # one FSDP writes, one shard file per worker (checked there), saved by a world of 2.
        assert_checkpoints_match(Path(final), world["single_checkpoints"] / "step-000004")
        assert json.loads((Path(final) / "manifest.json").read_text())["world_size"] == 2


# ---- communication: one gradient reduction per step with gradient accumulation ------------------------

def _count_worker(rank: int, world_size: int, init_file: str, model_dir: str, out: str) -> None:
    """Two micro-batches per step, with gradient_sync (as the loop does) and syncing every micro-batch:
    counts FSDP2's reduce-scatters (torch.distributed calls) and DDP's all-reduced buckets (a comm hook),
    and checks that the gradients are the same either way."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from trainables.modeling import load_causal_lm
    from trainables.sharding import gradient_sync, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        calls = {"reduce": 0}
        names = [n for n in ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce") if hasattr(dist, n)]
        for name in names:
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                calls["reduce"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        torch.manual_seed(rank)
        batches = [torch.randint(4, 16, (2, 10)) for _ in range(2)]  # this rank's two micro-batches

        def step(model, accumulate: bool) -> dict[str, torch.Tensor]:
            calls["reduce"] = 0
            for index, tokens in enumerate(batches):
                with gradient_sync(model, index == len(batches) - 1 or not accumulate):
                    model(input_ids=tokens, labels=tokens).loss.backward()
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            return {"calls": calls["reduce"], "grads": grads}

        result = {}
        fsdp = shard_model(load_causal_lm(model_dir), device=torch.device("cpu"))
        every, once = step(fsdp, accumulate=False), step(fsdp, accumulate=True)
        result["fsdp"] = {"every": every["calls"], "once": once["calls"],
                          "same": all(torch.allclose(every["grads"][n], g, atol=1e-6) for n, g in once["grads"].items())}
        buckets = {"count": 0}

        def counting_hook(state, bucket):
            buckets["count"] += 1
            return allreduce_hook(state, bucket)

        ddp = torch.nn.parallel.DistributedDataParallel(load_causal_lm(model_dir))
        ddp.register_comm_hook(None, counting_hook)
        counts = {}
        for accumulate in (False, True):
            buckets["count"] = 0
            grads = step(ddp, accumulate)["grads"]
            counts["once" if accumulate else "every"] = (buckets["count"], grads)
        result["ddp"] = {"every": counts["every"][0], "once": counts["once"][0],
                         "same": all(torch.allclose(counts["every"][1][n], g, atol=1e-6) for n, g in counts["once"][1].items())}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_gradient_accumulation_reduces_gradients_once_per_step(tmp_path):
    import torch.multiprocessing as mp

    model_dir = build_model_dir(tmp_path / "model", "llama")
    mp.spawn(_count_worker, args=(2, str(tmp_path / "rendezvous"), str(model_dir), str(tmp_path / "counts.json")),
             nprocs=2, join=True)
    counts = json.loads((tmp_path / "counts.json").read_text())
    print(counts)
    for strategy in ("fsdp", "ddp"):
        assert counts[strategy]["same"], counts  # the same gradients, summed over micro-batches and ranks
        assert 0 < counts[strategy]["once"] and counts[strategy]["every"] == 2 * counts[strategy]["once"], counts


def test_a_micro_batch_reads_its_metrics_from_the_device_once(tmp_path, monkeypatch):
    """DPOObjective.micro_batch used to call .item() once per metric (10 host syncs in training, each waiting for the
    GPU); now its metric sums are stacked and read with one tolist(), with the same values as .item()."""
    import sys

    from tests.tiny_world import engine_args
    from trainables.dpo_objective import DPOObjective, host_values
    from trainables.entrypoints import run_dpo

    sums = {"loss": torch.tensor(0.6931471824645996), "correct": torch.tensor(3), "tokens": torch.tensor(17.25)}
    assert host_values(sums) == {key: value.item() for key, value in sums.items()}

    build_model_dir(tmp_path / "model", "llama")
    write_jsonl(tmp_path / "train.jsonl", pair_rows("explicit", 8, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", pair_rows("explicit", 4, seed=2))
    spec = engine_args(str(tmp_path / "model"), str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"),
                       stage="dpo", output_dir=tmp_path / "out", reference_cache=tmp_path / "cache",
                       data__max_length=48, train__device="cpu", train__batch_size=8, train__micro_batch_size=4,
                       train__max_steps=1, train__warmup_steps=0, train__checkpoint_every=1, train__eval_every=1,
                       train__log_every=1)
    reads = {"item": 0, "tolist": 0, "micro_batches": 0}
    inside = {"now": False}
    original_item, original_tolist, original_micro_batch = torch.Tensor.item, torch.Tensor.tolist, DPOObjective.micro_batch

    def counting(name, original):
        def read(self, *args, **kwargs):
            if inside["now"] and sys._getframe(1).f_code.co_filename.endswith("dpo_objective.py"):
                reads[name] += 1  # the objective's own reads (the forward's bucketing has a few of its own)
            return original(self, *args, **kwargs)
        return read

    def micro_batch(self, *args, **kwargs):
        inside["now"], reads["micro_batches"] = True, reads["micro_batches"] + 1
        try:
            return original_micro_batch(self, *args, **kwargs)
        finally:
            inside["now"] = False

    monkeypatch.setattr(torch.Tensor, "item", counting("item", original_item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", original_tolist))
    monkeypatch.setattr(DPOObjective, "micro_batch", micro_batch)
    reports = []
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, lambda m, c: reports.append(m))
    assert reports and reads["micro_batches"] == 2, reads
    assert reads["item"] == 0 and reads["tolist"] == reads["micro_batches"], reads  # one read per micro-batch


# ---- HSDP: a 2 x 2 mesh (2 "nodes" of 2 ranks) ---------------------------------------------------------

def _hsdp_worker(rank: int, world_size: int, init_file: str, model_dir: str, out: str) -> None:
    """Each rank: LOCAL_WORLD_SIZE 2 (as Ray Train sets it on 2 nodes of 2 workers), the policy loaded sharded
    and one forward/backward on its quarter of the batch; rank 0 compares the full gradients with one process."""
    import os

    import torch.distributed as dist

    from trainables.modeling import load_causal_lm
    from trainables.sharding import FSDPPreparer, empty_causal_lm

    os.environ["LOCAL_WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        model = FSDPPreparer(torch.device("cpu")).load_sharded(
            lambda meta: empty_causal_lm(model_dir) if meta else load_causal_lm(model_dir))
        torch.manual_seed(0)
        tokens = torch.randint(4, 16, (world_size * 2, 10))  # the global batch; rank r takes rows 2r, 2r+1
        mine = tokens[2 * rank: 2 * rank + 2]
        model(input_ids=mine, labels=mine).loss.backward()  # FSDP averages gradients over all 4 ranks
        placements = {str(p.placements) for p in model.parameters()}
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            plain = load_causal_lm(model_dir)
            plain(input_ids=tokens, labels=tokens).loss.backward()  # equal lengths: the mean of the 4 ranks' means
            worst = max(float((grads[n] - p.grad).abs().max()) for n, p in plain.named_parameters())
            Path(out).write_text(json.dumps({"placements": sorted(placements), "worst": worst,
                                             "mesh": list(next(model.parameters()).device_mesh.shape)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_hsdp_on_a_2_by_2_mesh_gives_the_gradients_of_one_process(tmp_path):
    import torch.multiprocessing as mp

    model_dir = build_model_dir(tmp_path / "model", "llama")
    mp.spawn(_hsdp_worker, args=(4, str(tmp_path / "rendezvous"), str(model_dir), str(tmp_path / "hsdp.json")),
             nprocs=4, join=True)
    result = json.loads((tmp_path / "hsdp.json").read_text())
    print(result)
    assert result["mesh"] == [2, 2] and result["placements"] == ["(Replicate(), Shard(dim=0))"], result
    assert result["worst"] < 1e-5, result


# ---- a live reference under FSDP: sharded like the policy ----------------------------------------------

def _live_worker(rank: int, world_size: int, init_file: str, raw: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    from trainables.sharding import FSDPPreparer, is_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        loaded: list[torch.nn.Module] = []

        class Recording(FSDPPreparer):
            def load_sharded(self, build):
                loaded.append(super().load_sharded(build))
                return loaded[-1]

        reports = run_engine(raw, Path(out) / "live", workers=world_size, prepare_model=Recording(torch.device("cpu")))
        if rank == 0:
            Path(out, "live.json").write_text(json.dumps({"reports": reports, "sharded": [is_sharded(m) for m in loaded]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_a_live_reference_is_sharded_like_the_policy_and_gives_one_process_losses(world, tmp_path):
    import torch.multiprocessing as mp

    raw = {**world["raw"], "reference": {"mode": "live"}, "train": {**world["raw"]["train"], "checkpoint_every": 4}}
    single = run_engine(raw, tmp_path / "single", workers=1)
    mp.spawn(_live_worker, args=(2, str(tmp_path / "rendezvous"), raw, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "live.json").read_text())
    assert result["sharded"] == [True, True]  # the reference, then the policy: both loaded sharded
    assert [r["step"] for r in result["reports"]] == [1, 2, 3, 4]
    assert_same_metrics(result["reports"], single, "2 FSDP ranks, live reference")
