"""What one training run moves at scale: checkpoint size and write time, and bytes communicated per step.

Planned from the ModelShape and TrainingSetup of trainables/memory_plan.py (config.json alone, no weights)
for the checkpoint format and the collectives this engine uses; `dpo plan` prints it below the memory
table (orchestrator/workflows/plan.py). Nothing here imports the orchestrator.

Checkpoint (trainables/sharded_checkpoint.py, checkpointing.py). With FSDP over several workers it is sharded: the trained
weights in fp32 and AdamW's two fp32 moments, 12 bytes per trained weight, written by every rank in
parallel (torch.distributed.checkpoint spreads replicated HSDP shards over the replicas, so each writes about
1/N). Otherwise one process (rank 0) writes the model as save_pretrained does (every weight in its stored
dtype; under LoRA only the adapters) and the AdamW state. The write time is the bytes over the storage's
aggregate write bandwidth (`--storage-gbps`); a single writer may be held lower by its node's own link.

Communication, bytes each GPU sends per optimizer step (ring collectives: an all-gather or reduce-scatter of
X bytes over n ranks sends (n-1)/n x X from each rank, an all-reduce twice that):
    FSDP  each micro-batch all-gathers every weight for its forward and the decoder layers again for its
          backward (FSDP2 frees a layer's gathered weights after its forward; the root unit stays gathered),
          in the compute dtype (bf16 under bf16 mixed precision, else the stored dtype); once per step the
          trained weights' fp32 gradients are reduce-scattered (trainables/sharding.py: gradient_sync). Frozen
          weights (a LoRA base) are gathered too. A live reference is gathered for its forward once more
          per micro-batch (under LoRA it is the policy with its adapters off: the policy's weights again).
    HSDP  (workers spanning nodes: replicas x GPUs per node, trainables/sharding.py: mesh_shape) the same
          within a node, then each shard's gradients are all-reduced across the replicas: the only traffic
          between nodes.
    DDP   one all-reduce of the trained weights' fp32 gradients per step.
Evaluation, the reference pass and metric all-reduces (a few numbers) are not counted.
Tested by `python -m pytest tests/test_plan.py -q -k scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.memory_plan import DTYPE_BYTES, ModelShape, TrainingSetup, compute_bytes

GB = 10 ** 9  # storage bandwidths are quoted in decimal gigabytes per second
CHECKPOINT_BYTES_PER_TRAINED = 12  # fp32 weight + AdamW's exp_avg and exp_avg_sq
ADAM_BYTES_PER_TRAINED = 8


def mesh(setup: TrainingSetup) -> tuple[int, int]:
    """(replicas, shards) of the FSDP mesh the engine builds for this setup; (1, 1) without FSDP."""
    if setup.strategy != "fsdp":
        return 1, 1
    return setup.num_workers // setup.shards, setup.shards


@dataclass(frozen=True)
class ScalePlan:
    """Checkpoint and communication figures of one setup; bytes are exact counts of tensor bytes."""

    sharded_checkpoint: bool
    checkpoint_bytes: int  # every file of one checkpoint together
    writers: int  # ranks writing at once
    storage_bytes_per_second: float
    micro_batches: int  # per optimizer step, per worker
    replicas: int
    shards: int
    collectives: dict[str, int]  # name -> bytes each GPU sends per step
    between_nodes: int  # of which between nodes

    @property
    def checkpoint_bytes_per_writer(self) -> int:
        return -(-self.checkpoint_bytes // self.writers)

    @property
    def write_seconds(self) -> float:
        return self.checkpoint_bytes / self.storage_bytes_per_second

    @property
    def bytes_per_step(self) -> int:
        return sum(self.collectives.values())

    @property
    def within_node(self) -> int:
        return self.bytes_per_step - self.between_nodes


def _ring(ranks: int, payload: float) -> int:
    """Bytes one rank sends in a ring all-gather or reduce-scatter of `payload` bytes over `ranks` ranks."""
    return int(payload * (ranks - 1) / ranks) if ranks > 1 else 0


def plan_scale(shape: ModelShape, setup: TrainingSetup, *, trained: int, storage_gbps: float,
               reference: ModelShape | None = None) -> ScalePlan:
    """The checkpoint and per-step communication of `setup`; trained: the trained weights (MemoryPlan's)."""
    if storage_gbps <= 0:
        raise ValueError(f"storage bandwidth must be positive (got {storage_gbps} GB/s)")
    reference = reference or shape
    workers = setup.num_workers
    replicas, shards = mesh(setup)
    sharded = setup.strategy == "fsdp" and workers > 1
    if sharded:
        checkpoint, writers = trained * CHECKPOINT_BYTES_PER_TRAINED, workers
        if shape.tied_embeddings and setup.lora_rank is None:  # the state dict names a tied weight twice
            checkpoint += shape.vocab_size * shape.hidden_size * 4
    else:  # save_pretrained: the whole model in its stored dtype (only the adapters under LoRA), plus AdamW
        weights = trained * 4 if setup.lora_rank is not None else shape.parameters * DTYPE_BYTES[setup.weight_dtype]
        checkpoint, writers = weights + trained * ADAM_BYTES_PER_TRAINED, 1
    collectives: dict[str, int] = {}
    between = 0
    crosses_nodes = bool(setup.gpus_per_node) and workers > setup.gpus_per_node
    if setup.strategy == "fsdp" and workers > 1:
        gathered = compute_bytes(setup) if setup.compute == "bf16" else DTYPE_BYTES[setup.weight_dtype]
        layers = sum(shape.layer_parameters)
        per_micro_batch = (shape.parameters + layers) * gathered
        if setup.reference_mode == "live":  # its forward gathers it too (the policy itself under LoRA)
            per_micro_batch += (shape.parameters if setup.reference_is_policy else reference.parameters) * gathered
        collectives["all_gather"] = _ring(shards, per_micro_batch) * setup.micro_batches
        collectives["reduce_scatter"] = _ring(shards, trained * 4)
        if replicas > 1:  # HSDP: each shard's gradients averaged over the replicas, one per node
            collectives["all_reduce"] = 2 * _ring(replicas, trained * 4 / shards)
            between = collectives["all_reduce"]
        elif crosses_nodes:  # a 1-D mesh over several nodes (workers not a multiple of the GPUs per node)
            between = collectives["all_gather"] + collectives["reduce_scatter"]
    elif setup.strategy == "ddp" and workers > 1:
        collectives["all_reduce"] = 2 * _ring(workers, trained * 4)
        between = collectives["all_reduce"] if crosses_nodes else 0
    return ScalePlan(sharded_checkpoint=sharded, checkpoint_bytes=checkpoint, writers=writers,
                     storage_bytes_per_second=storage_gbps * GB, micro_batches=setup.micro_batches,
                     replicas=replicas, shards=shards, collectives=collectives, between_nodes=between)


def _size(value: float) -> str:
    gib = value / (1 << 30)
    return f"{gib:,.1f} GiB" if gib >= 1 else f"{value / (1 << 20):,.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def describe(plan: ScalePlan) -> list[str]:
    """The lines `dpo plan` prints for it."""
    if plan.sharded_checkpoint:
        how = (f"sharded, {plan.writers} ranks write {_size(plan.checkpoint_bytes_per_writer)} each "
               "(fp32 trained weights + AdamW moments)")
    else:
        how = "one file set written by rank 0 (model as save_pretrained + AdamW moments)"
    lines = [f"checkpoint: {_size(plan.checkpoint_bytes)}, {how}; {_duration(plan.write_seconds)} to write at "
             f"{plan.storage_bytes_per_second / GB:g} GB/s"]
    if not plan.collectives:
        return lines + ["communication per step: none (one worker)"]
    mesh_text = (f", mesh {plan.replicas} x {plan.shards} (HSDP)" if plan.replicas > 1
                 else f", mesh {plan.shards}" if plan.shards > 1 else "")
    parts = ", ".join(f"{name.replace('_', '-')} {_size(value)}" for name, value in plan.collectives.items())
    micro = f"{plan.micro_batches} micro-batch{'es' if plan.micro_batches != 1 else ''}"
    lines.append(f"communication per GPU per step ({micro}{mesh_text}): {_size(plan.bytes_per_step)} sent "
                 f"({parts}); between nodes {_size(plan.between_nodes)}")
    return lines


def as_json(plan: ScalePlan) -> dict:
    return {"checkpoint": {"format": "sharded" if plan.sharded_checkpoint else "single", "bytes": plan.checkpoint_bytes,
                           "writers": plan.writers, "bytes_per_writer": plan.checkpoint_bytes_per_writer,
                           "storage_gb_per_second": plan.storage_bytes_per_second / GB,
                           "write_seconds": round(plan.write_seconds, 3)},
            "communication": {"bytes_per_gpu_per_step": plan.bytes_per_step, "between_nodes_bytes": plan.between_nodes,
                              "within_node_bytes": plan.within_node, "collectives": dict(plan.collectives),
                              "micro_batches_per_step": plan.micro_batches, "mesh": [plan.replicas, plan.shards]}}
