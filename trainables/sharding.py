"""FSDP for `resources.strategy: fsdp`: shard a causal LM over the workers, clip, gather and restore full state.

torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) is used, not FSDP1 (`FullyShardedDataParallel`):
in this torch both run on CPU with gloo and on CUDA with NCCL, but FSDP2 keeps the model's own modules,
parameter names and optimizer layout (each parameter becomes a DTensor sharded on dim 0, which is what
FSDP1's use_orig_params=True emulates), clips with torch's own clip_grad_norm_, and needs none of FSDP1's
state_dict_type / optim_state_dict APIs, which this torch marks deprecated; FSDP1's sync_module_states
also refuses CPU modules.

Sharding units follow Hugging Face's `_no_split_modules` (the decoder-layer classes, the unit of
transformer_auto_wrap_policy): each decoder layer is one unit (its parameters are all-gathered just
before its forward and backward and freed after), and the root unit holds the rest (embeddings, final
norm, LM head). With a bf16 runtime on CUDA, parameters are all-gathered and computed in bf16 and
gradients reduced in fp32.

Checkpoints over several ranks are sharded (trainables/sharded_checkpoint.py: save_sharded_checkpoint, with
torch.distributed.checkpoint: each rank writes its own shards, no full gather) and load into any world
size (load_sharded_state). The gathers here (full_model_state, full_optimizer_state) serve FSDP on one
rank and tests; load_optimizer_state loads a single process's full, index-keyed optimizer state into a
sharded optimizer, so an FSDP run resumes from a single-process checkpoint too.
Everything also accepts unsharded (plain or DDP) models and then does what the loop did before.
Tested on CPU with gloo by `python -m pytest tests/test_fsdp.py -q`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# torch.distributed.fsdp and .tensor cost ~0.8 s of imports per process; they are imported only by
# shard_model. Until then no model can be an FSDPModule and no tensor a DTensor, so the checks below
# look the classes up in sys.modules instead of importing them for every DDP or single-process run.


def _loaded_class(module: str, name: str) -> type | None:
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model wrapped by `shard_model` (its forward runs collectives on every rank)."""
    fsdp_module = _loaded_class("torch.distributed.fsdp", "FSDPModule")
    return fsdp_module is not None and isinstance(model, fsdp_module)


def is_dtensor(value: Any) -> bool:
    """True for a DTensor (a sharded parameter, gradient or optimizer state under FSDP)."""
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(value, dtensor)


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The module classes named by Hugging Face's `_no_split_modules` (found also inside a PEFT wrapper)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return tuple(sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__))


def shard_model(model: torch.nn.Module, *, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard `model` over all ranks of the default process group (gloo on CPU, NCCL on CUDA).

    device: this worker's device; the parameters move there shard by shard (one layer at a time).
    compute_dtype: the runtime's autocast dtype; bf16 on CUDA turns on FSDP mixed precision (bf16
    all-gather and compute, fp32 gradient reduction); anything else keeps the parameters' dtype.
    Returns the same module object, now an FSDPModule.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("resources.strategy=fsdp needs torch.distributed to be initialised (a Ray Train worker "
                           "or torch.distributed.init_process_group) before the model is sharded")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = mesh_shape(dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "0")))
    # 2-D: HSDP, parameters replicated across nodes and sharded within one, so each layer's all-gather stays on
    # the node's fast links and only the gradient all-reduce between replicas crosses nodes.
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    mixed = compute_dtype == torch.bfloat16 and device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    layer_classes = decoder_layer_classes(model)
    if not layer_classes:
        logger.warning("%s names no _no_split_modules: sharding it as one unit (its full weights are gathered for "
                       "every forward)", type(model).__name__)
    units = [m for m in model.modules() if isinstance(m, layer_classes) and m is not model] if layer_classes else []
    for unit in reversed(units):  # inner units before the modules that contain them
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if dist.get_rank() == 0:
        logger.info("FSDP: %d %s units + root over %d ranks, mesh %s (%s%s)", len(units),
                    "/".join(c.__name__ for c in layer_classes) or "layer", dist.get_world_size(),
                    " x ".join(map(str, shape)) + (" (HSDP)" if len(shape) == 2 else ""), device.type,
                    ", bf16 mixed precision" if mixed else "")
    return model


def mesh_shape(world: int, local_world: int) -> tuple[int, ...]:
    """(world,) on one node: FSDP over every rank; (nodes, ranks per node) over several: HSDP.

    local_world: the ranks on this node (LOCAL_WORLD_SIZE, which Ray Train and torchrun set); 0 or a value
    that does not divide the world evenly keeps the 1-D mesh.
    """
    if 1 <= local_world < world and world % local_world == 0:
        return (world // local_world, local_world)
    return (world,)


def clip_gradients(model: torch.nn.Module, max_grad_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm to `max_grad_norm` (None: no clipping); returns the norm before clipping.

    Plain and DDP models hold full (all-reduced) gradients; under FSDP each rank holds a DTensor shard of
    every gradient, clip_grad_norm_ reduces the shard norms over ranks, and the norm comes back as a plain
    tensor, identical on every rank.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm else math.inf)
    return norm.full_tensor() if is_dtensor(norm) else norm


def lockstep_padding(model: torch.nn.Module, total: int, mine: int, batch_size: int) -> int:
    """How many extra (discarded) forwards this rank must run so that every rank runs as many as rank 0.

    Evaluation splits `total` items over the ranks (rank r takes items r, r+W, ...) into batches of
    `batch_size`; under FSDP each forward all-gathers parameters, so a rank with fewer batches would
    leave the others waiting forever. Zero for an unsharded model.
    """
    if not is_sharded(model):
        return 0
    most = math.ceil(math.ceil(total / dist.get_world_size()) / batch_size)
    return most - math.ceil(mine / batch_size)


def _gathered(value: Any, keep: bool) -> Any:
    """A DTensor as one full CPU tensor on the keeping rank (every rank must call); other values unchanged."""
    if not is_dtensor(value):
        return value.detach().cpu() if keep and torch.is_tensor(value) else value
    full = value.full_tensor()
    return full.detach().cpu() if keep else None


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's full state dict (Hugging Face key names) on rank 0, in CPU memory; {} elsewhere.

    A collective: every rank must call it, tensor by tensor, so at most one full tensor is on the device.
    """
    keep = dist.get_rank() == 0
    state = {}
    for key, value in model.state_dict().items():
        gathered = _gathered(value, keep)
        if keep:
            state[key] = gathered
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The sharded optimizer's full state on rank 0, index-keyed as `optimizer.state_dict()` of one process.

    A collective like full_model_state; other ranks get {}.
    """
    keep = dist.get_rank() == 0
    local = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for index in sorted(local["state"]):
        per_parameter = {name: _gathered(value, keep) for name, value in sorted(local["state"][index].items())}
        if keep:
            state[index] = per_parameter
    return {"state": state, "param_groups": local["param_groups"]} if keep else {}


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) to checkpoint: full, on rank 0, for a sharded model (every rank must
    call); (None, None) for a plain or DDP model, whose own state_dict() is already full."""
    if not is_sharded(model):
        return None, None
    return full_model_state(model), full_optimizer_state(optimizer)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, index-keyed optimizer state (from any checkpoint) into `optimizer`.

    For a sharded model every rank passes the same full state (each read the checkpoint) and keeps the
    shard of each per-parameter tensor that matches its parameter's shard; no communication.
    """
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    saved_count = sum(len(group["params"]) for group in state["param_groups"])
    if saved_count != len(parameters):
        raise ValueError(f"the checkpoint's optimizer state covers {saved_count} parameters, this model's optimizer "
                         f"{len(parameters)}: it was saved for another model or LoRA setting")
    sharded: dict[int, dict[str, Any]] = {}
    for index, per_parameter in state["state"].items():
        parameter = parameters[int(index)]
        sharded[index] = {}
        for name, value in per_parameter.items():
            if is_dtensor(parameter) and torch.is_tensor(value) and value.shape == parameter.shape:
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(parameter.to_local().device), parameter.device_mesh,
                                          parameter.placements, src_data_rank=None)  # local data: no scatter
            sharded[index][name] = value
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


# ---- loading that scales: meta-device construction on every rank, weights read once, broadcast into shards ----

def empty_causal_lm(path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                    dtype: str = "float32", attn_implementation: str | None = "sdpa",
                    disable_dropout: bool = True) -> torch.nn.Module:
    """The causal LM of `path` built on the meta device: its modules, names and shapes, and no memory at all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainables.modeling import _DTYPES, disable_dropout_in, usable_attn_implementation

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    attn_implementation = usable_attn_implementation(attn_implementation, warn=False)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=_DTYPES[dtype], **kwargs)
    if disable_dropout:
        disable_dropout_in(model)
    return model


def load_sharded(build: Any, *, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model sharded over all ranks whose weights were read by rank 0 only.

    build(meta): the model as the run wants it (LoRA attached, gradient checkpointing on); on the meta device
    when `meta` is True (empty_causal_lm), with its real weights otherwise.
    1) every rank builds the model on the meta device and shards it (no memory yet);
    2) rank 0 reads the full weights into host memory, and torch.distributed.checkpoint's set_model_state_dict
       broadcasts them tensor by tensor (full_state_dict + broadcast_from_rank0); each rank keeps its shard of
       each, assigned in place of the meta parameter (nothing is allocated before its data arrives);
    3) buffers outside the state dict (e.g. rotary inv_freq, computed in __init__) are broadcast from rank 0 too.
    So a non-zero rank holds its shard plus one full tensor at a time, never the full model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device(device)
    # peft draws LoRA's initial values from the CPU generator even on the meta device: without fork_rng rank 0's
    # real build would draw other adapters than one process with the same train.seed (different losses)
    with torch.random.fork_rng(devices=[]):
        meta_model = build(True)
    aliases = tied_aliases(meta_model)
    model = shard_model(meta_model, device=device, compute_dtype=compute_dtype)  # 1)
    full = build(False) if dist.get_rank() == 0 else None  # 2)
    set_model_state_dict(model, dict(full.state_dict()) if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # The broadcast assigns one new parameter per state-dict key, which unties tied weights (lm_head and
    # embed_tokens under tie_word_embeddings): the optimizer then held a parameter FSDP no longer owns and
    # get_state_dict failed (KeyError) at the first checkpoint. Point every alias back at its primary.
    for alias, primary in aliases:
        owner, _, attribute = alias.rpartition(".")
        model.get_submodule(owner).register_parameter(attribute, model.get_parameter(primary))
    persistent = set(model.state_dict())
    source = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():  # 3) same names on every rank: one model class
        if name in persistent:
            continue
        value = (source[name].to(device=device, dtype=buffer.dtype) if full is not None
                 else torch.empty(buffer.shape, dtype=buffer.dtype, device=device))
        dist.broadcast(value, src=0)
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attribute, value, persistent=False)
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if meta:
        raise RuntimeError(f"load_sharded: {len(meta)} tensors got no data from rank 0's weights (first: {meta[0]})")
    del full, source
    return model


def tied_aliases(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(alias, primary) names of parameters reachable under several names, e.g. a tied LM head and embedding."""
    first: dict[int, str] = {}
    aliases = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases.append((name, first[id(parameter)]))
        else:
            first[id(parameter)] = name
    return aliases


class FSDPPreparer:
    """`prepare_model` for resources.strategy fsdp: shards a built model (as shard_model), and, given how to
    build the model, loads it sharded (load_sharded: weights read by rank 0 only) instead."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype | None = None):
        self.device, self.compute_dtype = torch.device(device), compute_dtype

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard_model(model, device=self.device, compute_dtype=self.compute_dtype)

    def load_sharded(self, build: Any) -> torch.nn.Module:
        return load_sharded(build, device=self.device, compute_dtype=self.compute_dtype)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over ranks in this block's backward only when `enabled` (the step's last micro-batch).

    Gradient accumulation under DDP or FSDP otherwise reduces every micro-batch's gradients: with k
    micro-batches, k all-reduces (DDP) or reduce-scatters (FSDP) per step instead of one. FSDP2
    (set_requires_gradient_sync(False)) keeps unsharded gradients between micro-batches; DDP's no_sync
    accumulates locally and the final backward reduces the sum. Nothing changes without torch.distributed.
    """
    if enabled:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
