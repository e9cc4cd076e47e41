"""`dpo plan`: will a config's training run fit the GPU? Per-GPU memory by part, from config.json alone.

    dpo plan CONFIG [--set key=value ...] [--gpu-memory GIB] [--gpus-per-node N] [--storage-gbps GB/s] [--json]

The config is read as every command reads it (load_config, resolve_run); the model is built on the meta
device from its config.json (trainables/memory_plan.py: no weights are read, any Hugging Face causal LM),
and the arithmetic of that module gives the bytes of each part on one GPU for the configured strategy:
one device, DDP (a full replica per worker) or FSDP over resources.num_workers, full fine-tuning or LoRA.
The verdict compares the peak (training, or the reference pass before it) with --gpu-memory GiB, of which
USABLE_FRACTION is counted as usable (the rest: CUDA context, NCCL buffers, allocator fragmentation).
When it does not fit, each knob that would make it fit is found by planning again with it set:
gradient checkpointing, a smaller train.micro_batch_size, FSDP (over the workers, or more), LoRA, a
precomputed reference, a smaller reference.batch_size (alone, then in pairs, then in threes). Below the table:
a checkpoint's size and write time at --storage-gbps, and the bytes each GPU sends per step, within and between
nodes (trainables/scale_plan.py); --gpus-per-node places the workers on nodes as Ray Train does, so FSDP over
more workers than one node holds is HSDP (sharded within a node, replicated across). `--json` prints the same
as one object.

What is read: model.path (and reference.path), model.dtype, model.lora, model.attn_implementation,
data.max_length, train.batch_size, train.micro_batch_size, train.precision (auto: bf16, as on a GPU),
train.gradient_checkpointing (the other figure is shown too), resources.num_workers, resources.strategy,
reference.mode and batch_size. How the figures were checked against measured peaks: docs/memory-planning.md.

`dpo sweep` and `dpo study` call `refuse_unfit_trials` before Ray starts: when the trials use a GPU and
the driver can see one (its memory, times resources.gpus_per_worker when trials share it), a trial that
cannot fit is refused with the knobs that would make it fit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
from dataclasses import dataclass, replace
from typing import Any, Callable

from orchestrator.config.schema import ExperimentConfig
from orchestrator.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_GPU_GIB = 80.0
DEFAULT_STORAGE_GBPS = 1.0  # a shared file system's aggregate write bandwidth, GB/s; measure yours (docs/scale.md)
USABLE_FRACTION = 0.9  # of the GPU's memory; the rest is CUDA context, NCCL buffers and fragmentation
FSDP_WORKER_CHOICES = (2, 4, 8, 16, 32, 64)
DEFAULT_LORA_RANK = 16
MAX_SUGGESTIONS = 6


@dataclass(frozen=True)
class Knob:
    """A change of config keys that makes the run fit, and the per-GPU peak it gives."""

    settings: tuple[tuple[str, Any], ...]  # (config key, value), as --set takes them
    peak_bytes: int
    note: str = ""  # e.g. that train.batch_size must then be divisible by the workers

    def as_set_flags(self) -> str:
        return " ".join(f"--set {shlex.quote(f'{key}={_yaml(value)}')}" for key, value in self.settings)


@dataclass(frozen=True)
class PlanReport:
    """`dpo plan`'s answer: the plan as configured, the other checkpointing figure, the verdict, the knobs."""

    config_name: str
    plan: Any  # trainables.memory_plan.MemoryPlan, as configured
    checkpointing_configured: bool  # train.gradient_checkpointing
    other_checkpointing_bytes: int  # the training total with checkpointing flipped
    gpu_memory_bytes: int
    knobs: tuple[Knob, ...]
    scale: Any = None  # trainables.scale_plan.ScalePlan: checkpoint and communication

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * USABLE_FRACTION)

    @property
    def fits(self) -> bool:
        return self.plan.peak <= self.usable_bytes


# ---- config -> setup -> plan ----------------------------------------------------------------------

def configured_checkpointing(config: ExperimentConfig) -> bool:
    """train.gradient_checkpointing (issue 18): whether the engine recomputes decoder layers in backward."""
    return bool(config.train.gradient_checkpointing)


def training_setup(config: ExperimentConfig, gpus_per_node: int = 0):
    """The TrainingSetup of one worker of this config (resolve_run checks batch_size against the workers);
    gpus_per_node: 0 when every worker is on one node."""
    from orchestrator.config.spec import resolve_run
    from trainables.memory_plan import TrainingSetup

    workers = config.resources.num_workers
    spec = resolve_run(config, workers=workers, show_progress=False)
    local_batch = config.train.batch_size // workers
    strategy = "fsdp" if config.resources.strategy == "fsdp" else ("ddp" if workers > 1 else "single")
    lora = config.model.lora
    micro = min(spec.loop.micro_batch_size, local_batch)
    return TrainingSetup(
        strategy=strategy, num_workers=workers, micro_batch_pairs=micro, micro_batches=-(-local_batch // micro),
        gpus_per_node=gpus_per_node,
        seq_len=config.data.max_length, compute="fp32" if config.train.precision == "fp32" else "bf16",
        weight_dtype=config.model.dtype, lora_rank=lora.r if lora else None,
        lora_targets=(lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules))
        if lora else "all-linear",
        gradient_checkpointing=configured_checkpointing(config), reference_mode=config.reference.mode,
        reference_is_policy=config.reference.mode == "live" and lora is not None and not config.reference.path,
        reference_batch_pairs=config.reference.batch_size, attn_implementation=config.model.attn_implementation,
        exact_kl=config.dpo.kl_estimator == "exact" and config.reference.mode == "live")


def model_shapes(config: ExperimentConfig):
    """(policy shape, reference shape) from config.json; ConfigError naming the key when it cannot be read."""
    from trainables.memory_plan import ModelShapeError, read_model_shape

    def read(key: str, path: str):
        try:
            return read_model_shape(path, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code)
        except ModelShapeError as error:
            raise ConfigError(f"{key}: {path!r}: {error}. dpo plan reads only the model's config.json: give a directory "
                              "holding it (no weights needed) or a hub name") from None

    policy = read("model.path", config.model.path)
    uses_other = config.reference.path and config.reference.mode != "none"
    return policy, read("reference.path", config.reference.path) if uses_other else policy


def plan_config(config: ExperimentConfig, gpu_memory_gib: float = DEFAULT_GPU_GIB, *, gpus_per_node: int = 0,
                storage_gbps: float = DEFAULT_STORAGE_GBPS) -> PlanReport:
    """The plan of `config` on GPUs of `gpu_memory_gib` GiB, with the knobs that make it fit if it does not."""
    from trainables.memory_plan import head_chunk_tokens, plan_memory
    from trainables.scale_plan import plan_scale

    shape, reference = model_shapes(config)
    setup = replace(training_setup(config, gpus_per_node), head_chunk_tokens=head_chunk_tokens(shape.vocab_size))
    plan = plan_memory(shape, setup, reference=reference)
    flipped = plan_memory(shape, replace(setup, gradient_checkpointing=not setup.gradient_checkpointing),
                          reference=reference)
    gpu_bytes = int(gpu_memory_gib * GIB)
    usable = int(gpu_bytes * USABLE_FRACTION)
    knobs = () if plan.peak <= usable else find_knobs(config, shape, reference, setup, usable)
    scale = plan_scale(shape, setup, trained=plan.trained_parameters, storage_gbps=storage_gbps, reference=reference)
    return PlanReport(config_name=config.name, plan=plan, checkpointing_configured=configured_checkpointing(config),
                      other_checkpointing_bytes=flipped.total, gpu_memory_bytes=gpu_bytes, knobs=knobs, scale=scale)


def refuse_if_unfit(config: ExperimentConfig, gpu_memory_gib: float = DEFAULT_GPU_GIB) -> PlanReport:
    """For `dpo sweep` / `dpo study` before Ray starts: ConfigError naming the knobs when a trial cannot fit."""
    report = plan_config(config, gpu_memory_gib)
    if not report.fits:
        knobs = "\n".join(f"  {knob.as_set_flags()}  ->  {_gib(knob.peak_bytes)} per GPU{knob.note}"
                          for knob in report.knobs) or "  none of the knobs tried is enough (see `dpo plan`)"
        raise ConfigError(f"a trial of {config.name} needs {_gib(report.plan.peak)} per GPU, more than the "
                          f"{_gib(report.usable_bytes)} usable of {gpu_memory_gib:g} GiB (`dpo plan` shows the "
                          f"parts); any of these would fit:\n{knobs}")
    return report


def local_gpu_memory_bytes() -> int | None:
    """Memory of the driver's first CUDA GPU (what nvidia-smi reports as total), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def refuse_unfit_trials(config: ExperimentConfig) -> PlanReport | None:
    """`dpo sweep` / `dpo study`, before Ray starts: plan one trial's worker when it uses a GPU and refuse it
    (ConfigError naming the knobs) when it cannot fit. The GPU is the driver's own (a local sweep, or a
    head node with the workers' GPU type); trials sharing a GPU (resources.gpus_per_worker < 1) get their
    share of it. Without a GPU the driver can see, the plan is skipped with a line saying how to run it."""
    resources = config.resources
    if not resources.use_gpu:
        return None
    memory = local_gpu_memory_bytes()
    if memory is None:
        logger.info("no GPU on this machine to plan against: check that a trial fits with `dpo plan CONFIG "
                    "--gpu-memory GIB` (the workers' GPU memory)")
        return None
    share = min(1.0, resources.gpus_per_worker) if resources.gpus_per_worker > 0 else 1.0
    return refuse_if_unfit(config, memory * share / GIB)


def refuse_unfit_sweep(experiment) -> PlanReport | None:
    """refuse_unfit_trials for a resolved sweep (orchestrator.config.spec.Experiment): its trials' config."""
    if not json.loads(experiment.config_json).get("resources", {}).get("use_gpu"):
        return None
    return refuse_unfit_trials(ExperimentConfig.model_validate(experiment.resolved_config()))


# ---- knobs -----------------------------------------------------------------------------------------

def _knob_options(config: ExperimentConfig, setup) -> dict[str, list[tuple[tuple[tuple[str, Any], ...], Callable, str]]]:
    """Each knob's candidate values, least change first: (config settings, setup transform, note)."""
    options: dict[str, list] = {}
    if not setup.gradient_checkpointing:
        options["checkpointing"] = [((("train.gradient_checkpointing", True),),
                                     lambda s: replace(s, gradient_checkpointing=True), "")]
    options["micro_batch"] = [((("train.micro_batch_size", size),), lambda s, m=size: replace(s, micro_batch_pairs=m), "")
                              for size in _halvings(setup.micro_batch_pairs)]
    fsdp = []
    for workers in sorted({setup.num_workers, *FSDP_WORKER_CHOICES}):
        if workers < setup.num_workers or (setup.strategy == "fsdp" and workers == setup.num_workers):
            continue  # as many workers as now at least (FSDP over them first), more if FSDP already
        note = "" if config.train.batch_size % workers == 0 else \
            f" (train.batch_size {config.train.batch_size} must then be a multiple of {workers})"
        local = max(1, config.train.batch_size // workers)
        fsdp.append(((("resources.strategy", "fsdp"), ("resources.num_workers", workers)),
                     lambda s, n=workers, b=local: replace(s, strategy="fsdp", num_workers=n,
                                                           micro_batch_pairs=min(s.micro_batch_pairs, b)), note))
    options["fsdp"] = fsdp
    if setup.lora_rank is None:
        options["lora"] = [((("model.lora", {"r": DEFAULT_LORA_RANK}), ("model.dtype", "bfloat16")),
                            lambda s: replace(s, lora_rank=DEFAULT_LORA_RANK, lora_targets="all-linear",
                                              weight_dtype="bfloat16",
                                              reference_is_policy=s.reference_mode == "live" and not config.reference.path),
                            " (trains adapters, not all weights)")]
    if setup.reference_mode == "precomputed":  # the reference pass's batch (its own process, before training)
        options["reference_batch"] = [((("reference.batch_size", size),),
                                       lambda s, b=size: replace(s, reference_batch_pairs=b), "")
                                      for size in _halvings(setup.reference_batch_pairs)]
    if setup.reference_mode == "live" and config.dpo.kl_estimator != "exact":
        options["reference"] = [((("reference.mode", "precomputed"),),
                                 lambda s: replace(s, reference_mode="precomputed", reference_is_policy=False), "")]
    return options


def _halvings(value: int) -> list[int]:
    """value // 2, value // 4, ... down to 1."""
    sizes, size = [], value // 2
    while size >= 1:
        sizes.append(size)
        size //= 2
    return sizes


def find_knobs(config: ExperimentConfig, shape, reference, setup, usable_bytes: int) -> tuple[Knob, ...]:
    """Knobs (alone, else in pairs, else in threes) that bring the peak under `usable_bytes`, each at its
    least change (the largest micro-batch, the fewest FSDP workers)."""
    from trainables.memory_plan import plan_memory

    options = _knob_options(config, setup)
    for size in (1, 2, 3):
        found = []
        for kinds in itertools.combinations(options, size):
            for choice in itertools.product(*(options[kind] for kind in kinds)):
                changed = setup
                for _, transform, _ in choice:
                    changed = transform(changed)
                peak = plan_memory(shape, changed, reference=reference).peak
                if peak <= usable_bytes:
                    settings = tuple(item for settings, _, _ in choice for item in settings)
                    found.append(Knob(settings=settings, peak_bytes=peak, note="".join(note for *_, note in choice)))
                    break  # the least change of this combination
        if found:
            return tuple(found[:MAX_SUGGESTIONS])
    return ()


# ---- output ------------------------------------------------------------------------------------------

def _gib(value: int) -> str:
    """Bytes as GiB with two decimals, or MiB below 1 GiB (small models)."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / (1 << 20):.1f} MiB"


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _setup_line(plan) -> str:
    setup = plan.setup
    strategy = {"single": "one device", "ddp": f"DDP over {setup.num_workers} workers",
                "fsdp": f"FSDP over {setup.num_workers} workers"}[setup.strategy]
    trained = f"LoRA r={setup.lora_rank} ({plan.trained_parameters / 1e6:.1f}M adapter weights, base {setup.weight_dtype})" \
        if setup.lora_rank else "all weights (fp32 master weights)"
    return (f"{strategy}; {setup.compute} compute; trains {trained}; micro-batch {setup.micro_batch_pairs} pairs = "
            f"{setup.micro_batch_pairs * 2} rows x {setup.seq_len} tokens; reference {setup.reference_mode}").replace(
                "micro-batch 1 pairs", "micro-batch 1 pair")


def format_report(report: PlanReport) -> str:
    """The table `dpo plan` prints."""
    from trainables.memory_plan import PART_LABELS

    plan, setup, shape = report.plan, report.plan.setup, report.plan.shape
    lines = [f"model: {shape.architecture} ({shape.model_type}), {shape.parameters / 1e9:.3f}B parameters, "
             f"{shape.num_layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size}",
             f"setup: {_setup_line(plan)}", "", f"{'part':<40} {'per GPU':>12}"]
    for name, value in plan.parts.items():
        label = PART_LABELS[name]
        if name == "activations":
            label += " (checkpointing)" if setup.gradient_checkpointing else " (no checkpointing)"
        if value or name in ("weights", "activations", "logprob_head"):
            lines.append(f"{label:<40} {_gib(value):>12}")
    lines.append(f"{'total per GPU (training)':<40} {_gib(plan.total):>12}")
    if plan.reference_pass:
        lines.append(f"{'reference pass (before training, apart)':<40} {_gib(plan.reference_pass):>12}")
    other = "with" if not setup.gradient_checkpointing else "without"
    lines += ["", f"activations {other} checkpointing: "
                  f"{_gib(plan.activations_no_checkpointing if setup.gradient_checkpointing else plan.activations_checkpointing)}"
                  f" (total {_gib(report.other_checkpointing_bytes)}); a head keeping full logits would hold "
                  f"{_gib(plan.full_logits_head)} instead of {_gib(plan.parts['logprob_head'])}"]
    verdict = "fits" if report.fits else "does NOT fit"
    lines.append(f"verdict: {verdict}: peak {_gib(plan.peak)} per GPU against {_gib(report.usable_bytes)} usable of "
                 f"{report.gpu_memory_bytes / GIB:g} GiB ({USABLE_FRACTION:.0%})")
    if not report.fits:
        if report.knobs:
            lines.append("any of these would make it fit:")
            lines += [f"  {knob.as_set_flags()}  ->  {_gib(knob.peak_bytes)}{knob.note}" for knob in report.knobs]
        else:
            lines.append("none of the knobs tried (checkpointing, micro-batch, FSDP up to 64 workers, LoRA) is enough")
    if report.scale is not None:
        from trainables.scale_plan import describe

        lines += [""] + describe(report.scale)
    return "\n".join(lines)


def report_json(report: PlanReport) -> dict[str, Any]:
    """One object: per_gpu_bytes (the peak), fits, the parts and everything the table shows."""
    plan, setup, shape = report.plan, report.plan.setup, report.plan.shape
    with_ckpt = plan.total if setup.gradient_checkpointing else report.other_checkpointing_bytes
    without_ckpt = report.other_checkpointing_bytes if setup.gradient_checkpointing else plan.total
    return {
        "config": report.config_name,
        "per_gpu_bytes": plan.peak,
        "fits": report.fits,
        "gpu_memory_bytes": report.gpu_memory_bytes,
        "usable_bytes": report.usable_bytes,
        "training_bytes": plan.total,
        "parts": dict(plan.parts),
        "reference_pass_bytes": plan.reference_pass,
        "gradient_checkpointing": report.checkpointing_configured,
        "training_bytes_with_checkpointing": with_ckpt,
        "training_bytes_without_checkpointing": without_ckpt,
        "activations_bytes_with_checkpointing": plan.activations_checkpointing,
        "activations_bytes_without_checkpointing": plan.activations_no_checkpointing,
        "full_logits_head_bytes": plan.full_logits_head,
        "model": {"architecture": shape.architecture, "model_type": shape.model_type, "parameters": shape.parameters,
                  "trained_parameters": plan.trained_parameters, "layers": shape.num_layers,
                  "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
                  "vocab_size": shape.vocab_size},
        "setup": {"strategy": setup.strategy, "num_workers": setup.num_workers, "compute": setup.compute,
                  "weight_dtype": setup.weight_dtype, "lora_rank": setup.lora_rank,
                  "micro_batch_pairs": setup.micro_batch_pairs, "rows": setup.micro_batch_pairs * 2,
                  "seq_len": setup.seq_len, "reference_mode": setup.reference_mode},
        "knobs": [{"set": dict(knob.settings), "per_gpu_bytes": knob.peak_bytes, "note": knob.note.strip(" ()")}
                  for knob in report.knobs],
        **(_scale_json(report.scale) if report.scale is not None else {}),
    }


def _scale_json(scale) -> dict[str, Any]:
    from trainables.scale_plan import as_json

    return as_json(scale)


# ---- the command ------------------------------------------------------------------------------------

def _positive(unit: str, example: str):
    """An argparse type: a positive, finite number of `unit`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}, e.g. {example}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit} (got {text})")
        return value

    return parse


_positive_gib = _positive("GiB", "80")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment config, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set resources.strategy=fsdp (repeatable)")
    parser.add_argument("--gpu-memory", type=_positive_gib, default=DEFAULT_GPU_GIB, metavar="GIB",
                        help=f"memory of one GPU in GiB, as nvidia-smi reports it (default {DEFAULT_GPU_GIB:g})")
    parser.add_argument("--gpus-per-node", type=_whole_gpus, default=0, metavar="N",
                        help="GPUs of one node; FSDP over more workers is HSDP (sharded within a node, replicated "
                             "across nodes), as the engine builds it (default 0: every worker on one node)")
    parser.add_argument("--storage-gbps", type=_positive("GB/s", "2"), default=DEFAULT_STORAGE_GBPS, metavar="GB/S",
                        help="aggregate write bandwidth of the checkpoint storage in GB/s, for the checkpoint's write "
                             f"time (default {DEFAULT_STORAGE_GBPS:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _whole_gpus(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of GPUs, 0 or more (got {text!r})")
    return int(text)


def plan_command(args: argparse.Namespace) -> int:
    """`dpo plan`: prints the table (or JSON); exit 0 whether or not it fits (the verdict says which)."""
    from orchestrator.config import load_config

    report = plan_config(load_config(args.config, args.overrides), args.gpu_memory,
                         gpus_per_node=args.gpus_per_node, storage_gbps=args.storage_gbps)
    print(json.dumps(report_json(report), indent=2) if args.json else format_report(report))
    return 0
