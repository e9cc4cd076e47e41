"""Per-GPU memory of one DPO training step, planned from a model's config.json alone (no weights).

`read_model_shape` builds the causal LM on the meta device (exact parameter counts, any Hugging Face
architecture, nothing allocated) and reads the dimensions the arithmetic needs; `plan_memory` turns a
shape and a `TrainingSetup` into bytes per GPU, part by part. Nothing here imports the orchestrator:
orchestrator/workflows/plan.py reads the config, calls this and prints the table (`dpo plan`).

The parts, per GPU (P: all parameters, T: trained ones, N: FSDP workers, c: compute bytes, 2 for bf16):

    weights          the weights the forward computes with, in the compute dtype: a full replica (DDP,
                     one device; autocast's bf16 copies of fp32 weights), or under FSDP the stored shard
                     (when already in the compute dtype) plus the all-gathered units: the root unit
                     (embeddings, output layer, final norm, which FSDP keeps unsharded through the step)
                     and two decoder layers (the running one and the prefetched one)
    master_copy      fp32 weights behind a bf16 compute copy: the trained weights (the engine keeps
                     them fp32 and computes under autocast) and an fp32 frozen base; / N under FSDP
    gradients        T x 4 (fp32, like the weights they belong to); / N under FSDP, plus the unsharded
                     gradients of the root unit and one layer before their reduce-scatter
    ddp_buckets      T x 4: DDP's flat gradient buckets (gradient_as_bucket_view off), more than 1 worker
    optimizer        AdamW: two fp32 states per trained weight, T x 8; / N under FSDP
    activations      what the decoder layers keep for backward (`layer_activation_bytes` per token per
                     layer), for rows = 2 x micro-batch pairs (chosen and rejected) x max_length tokens;
                     with gradient checkpointing only each layer's input plus one layer recomputed
    logprob_head     the chunked head: the final hidden states and one float32 per token kept, plus one
                     chunk of (tokens x vocab) logits, their float32 copy and gradient while it runs
    live_reference   reference.mode live: a second model in model.dtype, whole on every worker (none
                     when LoRA's reference is the policy with its adapters off)

The total assumes everything is alive at once, which is exact under gradient accumulation (the
gradients of the earlier micro-batches are kept while the next one runs forward) and an upper bound by
at most the gradients otherwise. The reference pass (reference.mode precomputed) runs forward-only in
its own process before training, so it is planned apart (`reference_pass_bytes`). Compared with
measured CPU peaks of real steps by tests/test_plan.py and bench/plan_vs_measured.py; the method and
its limits are in docs/memory-planning.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROWS_PER_PAIR = 2  # chosen and rejected, one row each (the shared-prompt layout needs fewer tokens)
# Tokens per chunk of the log-prob head: its transient is one chunk of (tokens x vocab) logits, at most
# HEAD_CHUNK_TOKENS tokens and HEAD_CHUNK_LOGIT_BYTES of float32 logits (a 152k vocabulary: 220 tokens).
HEAD_CHUNK_TOKENS = 1024
HEAD_CHUNK_LOGIT_BYTES = 128 << 20


def head_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the engine's log-prob head (trainables/answer_head.py) for this vocabulary."""
    return max(64, min(HEAD_CHUNK_TOKENS, HEAD_CHUNK_LOGIT_BYTES // (4 * max(1, vocab_size))))
FSDP_GATHERED_LAYERS = 2  # the running decoder layer and the one FSDP prefetches


class ModelShapeError(ValueError):
    """A model whose config.json is missing, unreadable or of a type transformers does not know."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs to know about a causal LM, read from its config on the meta device."""

    architecture: str  # the model class, e.g. LlamaForCausalLM
    model_type: str
    parameters: int  # every parameter, tied ones once
    layer_parameters: tuple[int, ...]  # each decoder layer's parameters
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool  # gate, up and down projections (Llama, Qwen2, Mistral) rather than fc and proj (GPT-2)
    attention_inputs: int  # linears reading the attention norm's output: 3 (q, k, v) or 1 (fused qkv)
    mlp_inputs: int  # linears reading the MLP norm's output: 2 (gate, up), or 1 (fc, or a fused gate_up)
    rms_norm: bool  # RMSNorm (computed in fp32 by HF) rather than LayerNorm
    activation: str
    activation_saves: float  # elements the MLP activation and its consumer keep per input element
    tied_embeddings: bool
    linear_modules: tuple[tuple[str, int], ...] = field(repr=False)  # (name, in + out) of every linear but the output layer

    @property
    def root_parameters(self) -> int:
        """Parameters outside the decoder layers: embeddings, output layer, final norm (FSDP's root unit)."""
        return self.parameters - sum(self.layer_parameters)

    @property
    def largest_layer(self) -> int:
        return max(self.layer_parameters, default=0)

    def lora_parameters(self, rank: int, targets: str | tuple[str, ...] | list[str] = "all-linear") -> int:
        """Parameters of rank-`rank` LoRA adapters (A: r x in, B: out x r) on the targeted linears.

        targets as peft reads them: "all-linear" (every linear but the output layer), a list of module
        names (a module matches when its name ends with one), or another string (a regex the full name
        must match).
        """
        if targets == "all-linear":
            chosen = self.linear_modules
        elif isinstance(targets, str):
            chosen = tuple(item for item in self.linear_modules if re.fullmatch(targets, item[0]))
        else:
            chosen = tuple(item for item in self.linear_modules
                           if any(item[0] == t or item[0].endswith(f".{t}") for t in targets))
        return rank * sum(width for _, width in chosen)


@dataclass(frozen=True)
class TrainingSetup:
    """How one worker trains: what the config says, resolved (see orchestrator/workflows/plan.py)."""

    strategy: str  # single | ddp | fsdp
    num_workers: int
    micro_batch_pairs: int  # pairs per forward/backward on one worker
    seq_len: int  # data.max_length: rows are padded up to it at most
    compute: str  # bf16 | fp32 (train.precision; auto = bf16 on a GPU)
    weight_dtype: str = "float32"  # model.dtype: the frozen base's dtype under LoRA
    lora_rank: int | None = None
    lora_targets: str | tuple[str, ...] = "all-linear"
    gradient_checkpointing: bool = False
    reference_mode: str = "precomputed"  # precomputed | live | none
    reference_is_policy: bool = False  # LoRA + live without reference.path: the policy, adapters off
    reference_batch_pairs: int = 32  # reference.batch_size: pairs per forward of the reference pass
    attn_implementation: str = "sdpa"  # sdpa / flash_attention_2 keep no (seq x seq) tensor; eager does
    exact_kl: bool = False  # dpo.kl_estimator exact: full logits of the policy and the live reference are kept
    head_chunk_tokens: int = HEAD_CHUNK_TOKENS
    micro_batches: int = 1  # forward/backward passes per optimizer step on one worker
    gpus_per_node: int = 0  # 0: all workers on one node; else workers beyond it span nodes (HSDP under FSDP)

    @property
    def tokens(self) -> int:
        return self.micro_batch_pairs * ROWS_PER_PAIR * self.seq_len

    @property
    def shards(self) -> int:
        """The ways FSDP splits each weight: every worker, or under HSDP (workers spanning several nodes) the GPUs
        of one node, since the engine replicates across nodes (trainables/sharding.py: mesh_shape)."""
        if self.strategy != "fsdp":
            return 1
        from trainables.sharding import mesh_shape

        return mesh_shape(self.num_workers, self.gpus_per_node)[-1]


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU by part for one setup; `total` is the training peak."""

    shape: ModelShape
    setup: TrainingSetup
    parts: dict[str, int]  # in the order of PART_LABELS
    trained_parameters: int
    activations_checkpointing: int  # the activations part with and without checkpointing, whichever is set
    activations_no_checkpointing: int
    full_logits_head: int  # what a head that keeps (tokens x vocab) logits would hold, for comparison
    reference_pass: int  # the precomputing forward-only pass (its own process), 0 unless precomputed

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        """The most this run holds on one GPU at any time: training, or the reference pass before it."""
        return max(self.total, self.reference_pass)


PART_LABELS = {
    "weights": "weights (as computed)",
    "master_copy": "fp32 master copy",
    "gradients": "gradients (fp32)",
    "ddp_buckets": "DDP gradient buckets",
    "optimizer": "optimizer state (AdamW, 2 x fp32)",
    "activations": "activations",
    "logprob_head": "log-prob head (chunked)",
    "live_reference": "live reference model",
}


# ---- the model's shape, from config.json on the meta device --------------------------------------------

def read_model_shape(path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the causal LM at `path` (a directory holding config.json, or a hub name), no weights."""
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelShapeError(f"{path} holds no config.json")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else path, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ModelShapeError(f"could not read a model config from {path}: {error}") from error
    return model_shape_from_config(config, trust_remote_code=trust_remote_code)


def model_shape_from_config(config, *, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the causal LM a transformers config describes, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, ImportError, RuntimeError, NotImplementedError) as error:
        raise ModelShapeError(f"{type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}) is not a "
                              f"causal LM transformers can build: {error}") from error
    layers = _decoder_layers(model)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    if not layers or not hidden or not heads:
        raise ModelShapeError(f"{type(model).__name__}: no decoder layers, hidden size or head count found in its config")
    head_dim = _first(config, "head_dim") or hidden // heads
    intermediate = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    activation = next((value for value in (getattr(config, name, None) for name in ("hidden_act", "activation_function"))
                       if isinstance(value, str)), "gelu")
    layer_modules = list(layers[0].modules())
    q_width, kv_heads = heads * head_dim, _first(config, "num_key_value_heads") or heads
    outputs = [_weight_out(m) for m in layer_modules if _linear_width(m)]
    fused_gate_up = 2 * intermediate in outputs
    gated = fused_gate_up or sum(1 for m in layer_modules if _linear_width(m) and intermediate in _weight_shape(m)) >= 3
    output = model.get_output_embeddings()
    linear_modules = tuple((name, _linear_width(module)) for name, module in model.named_modules()
                           if _linear_width(module) and module is not output)
    input_embeddings = model.get_input_embeddings()
    return ModelShape(
        architecture=type(model).__name__, model_type=str(getattr(config, "model_type", "")),
        parameters=sum(p.numel() for p in model.parameters()),
        layer_parameters=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        num_layers=len(layers), hidden_size=int(hidden), intermediate_size=int(intermediate), num_heads=int(heads),
        num_kv_heads=int(_first(config, "num_key_value_heads") or heads), head_dim=int(head_dim),
        vocab_size=int(config.vocab_size),
        gated_mlp=gated, attention_inputs=1 if q_width + 2 * kv_heads * head_dim in outputs else 3,
        mlp_inputs=2 if gated and not fused_gate_up else 1,
        rms_norm=any("rmsnorm" in type(m).__name__.lower() for m in layer_modules),
        activation=activation, activation_saves=activation_saves(activation),
        tied_embeddings=output is not None and input_embeddings is not None and output.weight is input_embeddings.weight,
        linear_modules=linear_modules,
    )


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _decoder_layers(model) -> list:
    """The modules named by `_no_split_modules` (the decoder layers), else the longest ModuleList."""
    import torch

    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _weight_shape(module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if weight is not None and weight.ndim == 2 else ()


def _weight_out(module) -> int:
    """Output features of a linear layer: torch's Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    shape = _weight_shape(module)
    return shape[1] if type(module).__name__ == "Conv1D" else shape[0]


def _linear_width(module) -> int:
    """in + out features of a linear layer (torch Linear or GPT-2's Conv1D), else 0."""
    import torch

    if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
        shape = _weight_shape(module)
        return sum(shape) if shape else 0
    return 0


@lru_cache(maxsize=None)
def activation_saves(name: str) -> float:
    """Elements kept for backward per element of the MLP activation's input, counting its output once
    (kept by the next matmul or product): silu / exact gelu 2, GPT-2's tanh-formula gelu_new 5.

    Measured on 64 elements with saved_tensors_hooks, so any activation transformers knows is right.
    """
    import torch
    from transformers.activations import ACT2FN

    try:
        function = ACT2FN[name]
    except KeyError:
        return 2.0
    kept: dict[int, int] = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    inputs = torch.randn(64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = function(inputs)
    kept[outputs.untyped_storage().data_ptr()] = outputs.untyped_storage().nbytes()
    return sum(kept.values()) / inputs.untyped_storage().nbytes()


# ---- the arithmetic ---------------------------------------------------------------------------------

def compute_bytes(setup: TrainingSetup) -> int:
    """Bytes of an activation: 2 under bf16 autocast, or when a frozen LoRA base is itself 16-bit."""
    return 2 if setup.compute == "bf16" or (setup.lora_rank and DTYPE_BYTES[setup.weight_dtype] == 2) else 4


def stored_bytes(setup: TrainingSetup) -> tuple[int, int]:
    """(bytes of a trained weight, bytes of a frozen one): trained weights are kept fp32 whatever
    model.dtype says (the master weights; issue 18 refuses 16-bit weights for full training or keeps an
    fp32 master copy); a frozen LoRA base stays in model.dtype."""
    return 4, DTYPE_BYTES[setup.weight_dtype]


def residual_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes of the residual stream: the embeddings' dtype as computed (fp32 embeddings stay fp32 under
    autocast; FSDP's bf16 mixed precision and a bf16 frozen base give bf16)."""
    c = compute_bytes(setup)
    if setup.strategy == "fsdp" and c == 2:
        return 2
    return stored_bytes(setup)[1 if setup.lora_rank else 0]


def norm_output_in_compute_dtype(shape: ModelShape, setup: TrainingSetup) -> bool:
    """Whether a norm's output is already in the compute dtype (fp32 compute, or an RMSNorm with 16-bit
    weights and residual); else (fp32 norm weights, or LayerNorm, which autocast runs in fp32) each linear
    that reads it casts it to bf16 again and keeps its own copy."""
    return compute_bytes(setup) == 4 or (shape.rms_norm and residual_bytes(shape, setup) == 2)


def _norm_bytes(shape: ModelShape, setup: TrainingSetup, consumers: int) -> int:
    """A norm and the linears that read it, per token: the fp32 input, the normed values (RMSNorm keeps
    them for its weight's gradient) and the linear inputs (one copy, or one cast per linear)."""
    c, h = compute_bytes(setup), shape.hidden_size
    normed = (4 if residual_bytes(shape, setup) == 4 else 2) * h if shape.rms_norm else 0
    inputs = c * h * (1 if norm_output_in_compute_dtype(shape, setup) else consumers)
    return 4 * h + normed + inputs


def layer_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes one decoder layer keeps for backward, per token, without checkpointing.

    Two norms with their linears' inputs (`_norm_bytes`); attention: q, k and v as the SDPA kernel gets
    them (k and v repeated to all heads, as HF does with a padding mask), its output (which the output
    projection reads as it is), a float32 log-sum-exp per head, and under sdpa the padding mask as an
    additive bias (seq per token; eager attention keeps the softmax instead, heads x seq); the MLP: gate,
    up, activation and product when gated, else the activation's own saves. All in the compute dtype.
    """
    c = compute_bytes(setup)
    q_width = shape.num_heads * shape.head_dim
    norms = _norm_bytes(shape, setup, shape.attention_inputs) + _norm_bytes(shape, setup, shape.mlp_inputs)
    attention = c * 4 * q_width + 4 * shape.num_heads
    if setup.attn_implementation == "sdpa":  # the padding mask as an additive (rows, 1, seq, seq) bias, per layer
        attention += c * setup.seq_len
    if setup.attn_implementation == "eager":
        attention += shape.num_heads * setup.seq_len * (c + (4 if c == 2 else 0))
    mlp_elements = (shape.activation_saves + 2) if shape.gated_mlp else shape.activation_saves
    return int(norms + attention + c * mlp_elements * shape.intermediate_size)


def hidden_state_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes per token of the final hidden states the head reads: the final norm's output dtype."""
    return shape.hidden_size * (compute_bytes(setup) if norm_output_in_compute_dtype(shape, setup) else 4)


def activation_bytes(shape: ModelShape, setup: TrainingSetup, checkpointing: bool) -> int:
    """The decoder's activations kept for backward on one worker (final norm included, head excluded)."""
    tokens, h = setup.tokens, shape.hidden_size
    per_layer = layer_activation_bytes(shape, setup)
    final_norm = 4 * h + ((4 if residual_bytes(shape, setup) == 4 else 2) * h if shape.rms_norm else 0)
    if checkpointing:  # each layer's input, and one layer's activations while it is recomputed in backward
        return tokens * (shape.num_layers * residual_bytes(shape, setup) * h + per_layer + final_norm)
    return tokens * (shape.num_layers * per_layer + final_norm)


def head_bytes(shape: ModelShape, setup: TrainingSetup, tokens: int | None = None, backward: bool = True) -> int:
    """The chunked log-prob head, one chunk of tokens at a time.

    backward (training): kept, the final hidden states and one float32 per token; transient, the
    recomputed chunk's logits in the compute dtype and four float32 (chunk x vocab) tensors while the
    gradient is formed (the float32 logits or their exp, the softmax, the picked token's one-hot, their
    difference). Forward only (the reference pass): the chunk's logits, their float32 copy under bf16
    and logsumexp's float32 temporary.
    """
    tokens = setup.tokens if tokens is None else tokens
    c, chunk = compute_bytes(setup), min(tokens, setup.head_chunk_tokens)
    if not backward:
        return chunk * shape.vocab_size * (c + 4 + (4 if c == 2 else 0))
    return tokens * (hidden_state_bytes(shape, setup) + 4) + chunk * shape.vocab_size * (c + 16)


def full_logits_head_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """A head that keeps (tokens x vocab) logits for backward (the engine's before the chunked head):
    the logits and, under bf16, their float32 copies, plus three float32 (tokens x vocab) tensors while
    the gradient is formed in backward."""
    c = compute_bytes(setup)
    return setup.tokens * shape.vocab_size * (c + 16)


def reference_pass_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """The precomputing pass (0 unless reference.mode precomputed): the reference in model.dtype, forward
    only on reference.batch_size pairs, nothing kept for backward. Its peak: the weights, the final hidden
    states, and the larger of one layer's working set (residual, norm, the MLP's intermediates or q, k, v
    and the attention output) and the head's chunk, each with autocast's bf16 copy of its weights."""
    if setup.reference_mode != "precomputed":
        return 0
    c, h, stored = compute_bytes(setup), shape.hidden_size, DTYPE_BYTES[setup.weight_dtype]
    tokens = setup.reference_batch_pairs * ROWS_PER_PAIR * setup.seq_len
    mlp = c * shape.intermediate_size * (3 if shape.gated_mlp else shape.activation_saves)  # alive at once
    casts = c != stored  # autocast's bf16 copy of the weights in use: one layer's, then the output layer's
    layer = int(tokens * (stored * h + 4 * h + c * h + max(mlp, c * 4 * shape.num_heads * shape.head_dim)))
    layer += shape.largest_layer * c if casts else 0
    head = head_bytes(shape, setup, tokens=tokens, backward=False) + (shape.vocab_size * h * c if casts else 0)
    return shape.parameters * stored + tokens * hidden_state_bytes(shape, setup) + max(layer, head)


def plan_memory(shape: ModelShape, setup: TrainingSetup, reference: ModelShape | None = None) -> MemoryPlan:
    """Per-GPU bytes by part for `setup` (see the module docstring for each part).

    reference: the reference model's shape when reference.path names another model (default: `shape`).
    """
    if setup.strategy not in ("single", "ddp", "fsdp"):
        raise ValueError(f"strategy: single, ddp or fsdp (got {setup.strategy!r})")
    reference = reference or shape
    c, n = compute_bytes(setup), setup.shards
    trained_bytes, frozen_bytes = stored_bytes(setup)
    lora = setup.lora_rank is not None
    adapters = shape.lora_parameters(setup.lora_rank, setup.lora_targets) if lora else 0
    trained = adapters if lora else shape.parameters
    groups = [(adapters, trained_bytes), (shape.parameters, frozen_bytes)] if lora else [(trained, trained_bytes)]
    at_compute = sum(count for count, stored in groups if stored == c)  # stored as computed: no extra copy
    fp32_behind = sum(count for count, stored in groups if stored != c)  # fp32 stored, bf16 computed
    if setup.strategy == "fsdp":
        gathered_units = shape.root_parameters + FSDP_GATHERED_LAYERS * shape.largest_layer
        weights = at_compute * c // n + gathered_units * c
        unsharded_grads = _trained_share(shape.root_parameters + shape.largest_layer, trained, shape) * 4
        gradients = trained * 4 // n + unsharded_grads
    else:
        weights = at_compute * c + fp32_behind * c
        gradients = trained * 4
    with_checkpointing = activation_bytes(shape, setup, True)
    without_checkpointing = activation_bytes(shape, setup, False)
    head = head_bytes(shape, setup)
    if setup.exact_kl:  # the exact KL keeps the policy's and the reference's full logits
        head = full_logits_head_bytes(shape, setup) + setup.tokens * reference.vocab_size * c
    live = 0
    if setup.reference_mode == "live" and not setup.reference_is_policy:
        live = reference.parameters * DTYPE_BYTES[setup.weight_dtype]
    parts = {
        "weights": weights,
        "master_copy": fp32_behind * 4 // n,
        "gradients": gradients,
        "ddp_buckets": trained * 4 if setup.strategy == "ddp" and setup.num_workers > 1 else 0,
        "optimizer": trained * 8 // n,
        "activations": with_checkpointing if setup.gradient_checkpointing else without_checkpointing,
        "logprob_head": head,
        "live_reference": live,
    }
    return MemoryPlan(shape=shape, setup=setup, parts=parts, trained_parameters=trained,
                      activations_checkpointing=with_checkpointing, activations_no_checkpointing=without_checkpointing,
                      full_logits_head=full_logits_head_bytes(shape, setup),
                      reference_pass=reference_pass_bytes(reference, setup))


def _trained_share(count: int, trained: int, shape: ModelShape) -> int:
    """The trained part of `count` parameters: all of them in full fine-tuning, their share under LoRA."""
    return count if trained == shape.parameters else count * trained // max(1, shape.parameters)
