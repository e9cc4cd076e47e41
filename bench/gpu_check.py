"""One command that proves the GPU path on one NVIDIA GPU in at most 8 minutes, and runs what it can on a CPU.

    python bench/gpu_check.py                                  # CUDA when present; without it the CPU subset (~3 min)
    python bench/gpu_check.py --only sdpa_mask,fsdp --out /tmp/check.json
    python bench/gpu_check.py --budget 600 --keep-scratch

Every check runs in a subprocess of its own (`python bench/gpu_check.py --child NAME ...`) with its own timeout, cut
to what is left of --budget (450 s on CUDA, so that with start-up and a kill's grace the run stays under
8 minutes; 180 s on a CPU; a check is skipped when less than its minimum is left,
so the last ones go first on a slow machine; --timeout-scale stretches all of it); after every
check the JSON (--out, default bench/results/gpu_check-<date>.json) is rewritten, so a killed run keeps what it did.
A timed-out check's process group gets SIGTERM, then SIGKILL 10 s later. The checks, in order:

  environment         torch, CUDA, GPU name, bf16 support, flash-attn installed?, the engine's config switches
  losses_precomputed  `dpo train configs/quickstart.yaml` (the demo's random-init Llama, built locally), 30 steps,
  losses_live         bf16 on CUDA (fp32 on CPU), precomputed / live reference: step-1 loss = ln 2, losses fall
  sdpa_mask           the shared-prompt forward (4D additive mask, GQA Qwen2-shaped model) forward + backward under
                      sdpa_kernel([EFFICIENT_ATTENTION, FLASH_ATTENTION]): no math fall-back, same log-probs as math
  fsdp                FSDP2 (trainables/sharding.py) with NCCL at world size 1 (init_process_group, MASTER_ADDR
                      127.0.0.1, no torchrun): 4 steps, checkpoints, resume from step 2 gives the same losses
  peak_memory         a 0.5B Qwen2-shaped random model at 8 pairs x 1024 tokens: peak memory and bytes saved for
                      backward of DPO steps as the engine runs them, with full logits instead of the answer head,
                      and with gradient checkpointing (HF's, applied by the check, while the engine has no switch)
  mfu_vs_trl          bench/gpu.py (shared / unshared engine, TRL precomputed), 10 timed steps
  sweep               `dpo sweep configs/quickstart.yaml`: 2 grid trials with resources.gpus_per_worker 0.5, seen
                      sharing the GPU (nvidia-smi compute processes, or overlapping trial times)

On a CPU: environment, both loss checks (fp32) and the sweep (use_gpu false, 2 short trials, if time allows) run;
sdpa_mask, fsdp (gloo) and peak_memory (small model) run as smoke tests of the same code at small sizes and are
reported as skipped, with the smoke's outcome; mfu_vs_trl is skipped (`python bench/gpu.py` is the CPU figure).
CPU checks run with OMP_NUM_THREADS=1 unless it is set.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
LN2 = math.log(2)


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[["Context"], dict[str, Any]]
    timeout: tuple[int, int]  # seconds: (CUDA, CPU)
    minimum: tuple[int, int]  # the least time worth starting it with, (CUDA, CPU)
    on_cpu: str  # "run" | "smoke" (small sizes, reported as skipped with the smoke's outcome) | a reason to skip


@dataclass
class Context:
    """What a check's subprocess gets: its device and scratch folder, and a way to save partial details."""

    cuda: bool
    scratch: Path
    result_file: Path

    @property
    def device(self):
        import torch

        return torch.device("cuda", 0) if self.cuda else torch.device("cpu")

    def save(self, details: dict[str, Any]) -> None:
        write_json(self.result_file, {"status": "running", "details": details})


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    partial.write_text(json.dumps(document, indent=2, default=str))
    os.replace(partial, path)  # a reader never sees half a file


def quiet() -> None:
    import warnings

    import transformers

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def engine_features() -> dict[str, Any]:
    """Which of issue 18's switches this build's config offers (looked up by name, never assumed)."""
    from pydantic import BaseModel

    from orchestrator.config.schema import ExperimentConfig

    keys = [f"{section}.{name}" for section, field in ExperimentConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            for name in field.annotation.model_fields]
    checkpointing = next((key for key in keys if key.endswith("gradient_checkpointing")), None)
    head = [key for key in keys if any(word in key for word in ("logprob", "log_prob", "lm_head", "logit"))]
    lacks = [] if checkpointing else ["train.gradient_checkpointing: no such config key in this build"]
    answer_head = importlib.util.find_spec("trainables.answer_head") is not None
    return {"gradient_checkpointing_key": checkpointing, "logprob_head_keys": head, "answer_head_module": answer_head,
            "engine_lacks": lacks + ([] if answer_head else ["the chunked log-prob head (trainables/answer_head.py)"])}


def demo_pairs(ctx: "Context") -> tuple[Path, Path]:
    """The demo's first training and held-out pairs (the quickstart's data): 640 and 64 on CUDA, 256 and 32 on a CPU."""
    from orchestrator.workflows.demo_assets import build_demo_assets

    files = build_demo_assets().data_files
    paths = ctx.scratch / "demo-train.jsonl", ctx.scratch / "demo-eval.jsonl"
    counts = (640, 64) if ctx.cuda else (256, 32)
    for path, source, count in zip(paths, (files["preference_train"], files["preference_eval"]), counts):
        if not path.is_file():
            partial = path.with_suffix(".part")
            partial.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
            os.replace(partial, path)
    return paths


def cli_sets(values: dict[str, Any]) -> list[str]:
    return [part for key, value in values.items() for part in ("--set", f"{key}={value}")]


def shown(command: str, parts: list[str]) -> str:
    return " ".join([command, *map(shlex.quote, parts)])


# ---- the checks: each runs in its own subprocess and returns {"status": ..., "details": {...}} ----------------

def check_environment(ctx: Context) -> dict[str, Any]:
    import importlib.metadata

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    details: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        "packages": {name: version(name)
                     for name in ("transformers", "trl", "ray", "accelerate", "peft", "flash-attn")},
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
    }
    warnings = []
    if ctx.cuda:
        properties = torch.cuda.get_device_properties(0)
        details |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                    "gpu_memory_gib": round(properties.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported(),
                    "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
                    "sdpa_mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled()}
        try:
            details["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            details["nvidia_smi"] = f"unavailable: {error}"
        if not details["bf16"]:
            warnings.append("this GPU has no bf16: the engine's precision auto falls back to fp32")
        if not details["flash_attn_importable"]:
            warnings.append("flash-attn is not installed: attn_implementation flash_attention_2 is unavailable")
    details["engine_features"] = engine_features()
    details["warnings"] = warnings
    ok = ctx.cuda is False or details.get("gpu_count", 0) >= 1
    return {"status": "passed" if ok else "failed", "details": details}


def train_losses(ctx: Context, reference_mode: str) -> dict[str, Any]:
    from orchestrator.cli.main import main as dpo

    quiet()
    folder = ctx.scratch / f"train-{reference_mode}"
    precision = "bf16" if ctx.cuda else "fp32"
    train, held_out = demo_pairs(ctx)
    sets = {"data.train": train, "data.eval": held_out, "train.max_steps": 30,
            "train.batch_size": 32 if ctx.cuda else 16, "train.log_every": 1, "train.eval_every": 30,
            "train.checkpoint_every": 30, "train.keep_checkpoints": 1, "train.precision": precision,
            "train.device": "cuda" if ctx.cuda else "cpu", "reference.mode": reference_mode,
            "reference.cache_dir": folder / "reference", "output_dir": folder / "output"}
    started = time.perf_counter()
    code = dpo(["train", str(REPO / "configs" / "quickstart.yaml"), *cli_sets(sets)])
    metrics_file = folder / "output" / "metrics.jsonl"
    if code != 0 or not metrics_file.is_file():
        return {"status": "failed", "details": {"command": shown("dpo train configs/quickstart.yaml", cli_sets(sets)),
                                                "exit_code": code, "reason": "dpo train did not finish"}}
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    losses = [record["train/loss"] for record in metrics if "train/loss" in record]
    tolerance = 5e-3 if ctx.cuda else 1e-4  # bf16 autocast rounds the policy's and the reference's passes apart
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    details = {"command": shown("dpo train configs/quickstart.yaml", cli_sets(sets)), "exit_code": code,
               "precision": precision, "seconds": round(time.perf_counter() - started, 1), "losses": losses,
               "step1_loss": losses[0], "step1_minus_ln2": losses[0] - LN2, "step1_tolerance": tolerance,
               "mean_first5": first, "mean_last5": last,
               "final_eval": {k: v for k, v in metrics[-1].items() if k.startswith("eval/")}}
    ok = code == 0 and len(losses) == 30 and abs(losses[0] - LN2) <= tolerance and last < first - 0.02
    return {"status": "passed" if ok else "failed", "details": details}


def check_sdpa_mask(ctx: Context) -> dict[str, Any]:
    """The engine's shared-prompt forward (trainables/shared_prompt.py) with only efficient SDPA kernels allowed."""
    import warnings

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainables.logprobs import forward_logps
    from trainables.shared_prompt import attention_implementation, shared_forward_logps
    from trainables.tokenization import TokenizedPair, collate_pairs

    quiet()
    torch.manual_seed(0)
    device = ctx.device
    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         eos_token_id=1, use_cache=False)  # GQA, as Qwen2-0.5B (14 / 2 heads)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).train()
    generator = torch.Generator().manual_seed(0)
    ids = lambda count: tuple(torch.randint(3, 1024, (count,), generator=generator).tolist())
    shapes = [(37, 50, 20), (5, 64, 64), (20, 3, 40), (64, 33, 7)]  # prompt, chosen, rejected: rows of unequal length
    pairs = [TokenizedPair(ids(p), ids(c) + (1,), ids(r) + (1,)) for p, c, r in shapes]
    batch = {key: value.to(device) for key, value in collate_pairs(pairs, 0).items()}
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.cuda)
    shared = lambda: shared_forward_logps(model, pairs, batch["answer_mask"], 0).token_logps  # (2B, seq) float32
    allowed = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION] if ctx.cuda else [SDPBackend.FLASH_ATTENTION]
    details: dict[str, Any] = {"attention": attention_implementation(model), "allowed": [b.name for b in allowed],
                               "precision": "bf16 autocast" if ctx.cuda else "fp32"}
    try:  # the CPU-side aten op names say which SDPA kernel ran (no CUPTI needed)
        with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CPU]) as profiler:
            warnings.simplefilter("always")
            with autocast(), sdpa_kernel(allowed):
                values = shared()
                values.sum().backward()  # the training path: the kernel's backward too
            if ctx.cuda:
                torch.cuda.synchronize()
    except RuntimeError as error:  # "No available kernel": the mask sends SDPA to the math fall-back
        details["error"] = str(error)[-2000:]
        return {"status": "failed", "details": details}
    names = sorted({event.key for event in profiler.key_averages()
                    if any(word in event.key.lower() for word in ("attention", "fmha", "flash", "sdpa"))})
    with torch.no_grad(), autocast():
        with sdpa_kernel([SDPBackend.MATH]):
            math_values = shared()
        standard = forward_logps(model, batch).token_logps
    tolerance = 5e-2 if ctx.cuda else 1e-4  # the engine's own probe tolerances (trainables/shared_prompt.py)
    details |= {"attention_ops": names, "warnings": sorted({str(w.message)[:300] for w in caught}),
                "max_diff_vs_math_kernel": float((values.detach() - math_values).abs().max()),
                "max_diff_vs_standard_layout": float((values.detach() - standard).abs().max()), "tolerance": tolerance}
    efficient = any("efficient_attention" in n or "flash_attention" in n for n in names)
    math_used = any("attention_math" in n for n in names)
    ok = (efficient and not math_used and details["max_diff_vs_math_kernel"] <= tolerance
          and details["max_diff_vs_standard_layout"] <= tolerance)
    return {"status": "passed" if ok else "failed", "details": details}


def demo_spec(ctx: Context, folder: Path, **settings: Any):
    from orchestrator.workflows.demo_assets import build_demo_assets
    from tests.tiny_world import engine_args

    train, _ = demo_pairs(ctx)
    return engine_args(str(build_demo_assets().model_dir), str(train), reference_cache=folder / "reference",
                       output_dir=folder / "output", train__device="cuda:0" if ctx.cuda else "cpu",
                       train__precision="bf16" if ctx.cuda else "fp32", **settings)


def check_fsdp(ctx: Context) -> dict[str, Any]:
    """World size 1, no torchrun: FSDP2 over one rank, NCCL on CUDA (gloo for the CPU smoke), save and resume."""
    import socket
    from dataclasses import replace

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from trainables.entrypoints import run_dpo
    from trainables.modeling import parameter_count, resolve_autocast_dtype
    from trainables.sharding import is_sharded, shard_model

    quiet()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    details: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    settings = dict(data__max_length=64, train__batch_size=8, train__micro_batch_size=8, train__max_steps=4,
                    train__checkpoint_every=2, train__keep_checkpoints=None, train__eval_every=4, train__log_every=1,
                    train__learning_rate=1e-3, train__warmup_steps=0, resources__strategy="fsdp")
    sharded = []

    def prepare(model):
        compute = resolve_autocast_dtype("bf16" if ctx.cuda else "fp32", ctx.device)
        model = shard_model(model, device=ctx.device, compute_dtype=compute)
        sharded.append(is_sharded(model))
        return model

    def run(folder: Path, resume_from: str | None) -> list[dict[str, Any]]:
        spec = demo_spec(ctx, folder, **settings)
        reports: list[dict[str, Any]] = []
        run_dpo(spec.model, spec.data, spec.preference, spec.loop, replace(spec.runtime, resume_from=resume_from),
                lambda metrics, checkpoint: reports.append({**metrics, "checkpoint": checkpoint}),
                prepare_model=prepare)
        return reports

    try:
        straight = run(ctx.scratch / "fsdp-straight", None)
        checkpoint = next(r["checkpoint"] for r in straight if r["step"] == 2 and r["checkpoint"])
        resumed = run(ctx.scratch / "fsdp-resumed", checkpoint)
    finally:
        dist.destroy_process_group()
    loss = lambda reports, step: next(r["train/loss"] for r in reports if r["step"] == step)
    differences = [abs(loss(straight, step) - loss(resumed, step)) for step in (3, 4)]
    saved = AutoModelForCausalLM.from_pretrained(Path(checkpoint) / "model")
    tolerance = 1e-3 if ctx.cuda else 1e-5  # bf16 mixed precision, non-deterministic CUDA reductions
    details |= {"sharded": sharded, "losses_straight": [loss(straight, s) for s in (1, 2, 3, 4)],
                "losses_resumed": [loss(resumed, s) for s in (3, 4)], "max_resume_difference": max(differences),
                "tolerance": tolerance, "checkpoint_parameters": parameter_count(saved)}
    ok = all(sharded) and max(differences) <= tolerance and [r["step"] for r in resumed if "train/loss" in r] == [3, 4]
    return {"status": "passed" if ok else "failed", "details": details}


class SavedForBackward:
    """saved_tensors_hooks packer: storages saved for backward during one training step (deduplicated)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        self.vocab_size, self.hidden_size, self.recording, self.storages = vocab_size, hidden_size, True, {}
        self.parameters: set[int] = set()  # storages of the model's own weights: kept anyway, not counted

    def pack(self, tensor):
        if self.recording and tensor.untyped_storage().data_ptr() not in self.parameters:
            storage = tensor.untyped_storage()
            vocab_like = (tensor.dim() >= 1 and tensor.shape[-1] == self.vocab_size  # (tokens.., vocab), not the weight
                          and tensor.numel() // self.vocab_size != self.hidden_size)
            entry = self.storages.setdefault(storage.data_ptr(), [storage.nbytes(), False])
            entry[1] |= vocab_like
        return tensor

    def summary(self) -> dict[str, int]:
        return {"saved_bytes": sum(size for size, _ in self.storages.values()),
                "saved_vocab_sized_bytes": sum(size for size, vocab in self.storages.values() if vocab),
                "largest_saved_bytes": max((size for size, _ in self.storages.values()), default=0)}


def check_peak_memory(ctx: Context) -> dict[str, Any]:
    """Peak memory of DPO steps of 8 pairs: 0.5B at 1024 tokens on CUDA (small model at 128 on the CPU smoke)."""
    import gc

    import torch

    import gpu as bench_gpu
    from tests.tiny_world import engine_args
    from trainables.entrypoints import load_preference_data, precompute_reference, run_dpo

    quiet()
    size, seq_len = ("0.5b", 1024) if ctx.cuda else ("small", 128)
    device = ctx.device
    config = bench_gpu.llama_config(size, seq_len)
    model_dir, pairs_file = ctx.scratch / "peak-model", ctx.scratch / "peak-pairs.jsonl"
    bench_gpu.write_model_and_tokenizer(model_dir, config, device)
    pairs = bench_gpu.synthetic_pairs(16, seq_len, config.vocab_size)
    pairs_file.write_text("".join(json.dumps(pair.__dict__) + "\n" for pair in pairs))
    features = engine_features()
    settings = dict(reference_cache=ctx.scratch / "peak-reference", data__max_length=seq_len, train__batch_size=8,
                    train__micro_batch_size=8, train__max_steps=2, train__warmup_steps=0, train__eval_every=2,
                    train__checkpoint_every=2, train__keep_checkpoints=1, train__log_every=1, train__learning_rate=1e-5,
                    train__device=str(device), train__precision="bf16" if ctx.cuda else "fp32")
    spec = engine_args(str(model_dir), str(pairs_file), output_dir=ctx.scratch / "peak-0", **settings)
    data = load_preference_data(spec.model, spec.data)
    bench_gpu.reset_peak_memory(device)
    precompute_reference(spec.model, spec.preference, data, spec.runtime)  # filled once; every variant reuses it
    details: dict[str, Any] = {
        "model": f"random-init Llama with Qwen2-0.5B's dimensions ({size})" if ctx.cuda else "small Llama (CPU smoke)",
        "pairs_per_step": 8, "tokens_per_row": seq_len,
        "memory": "torch.cuda.max_memory_allocated" if ctx.cuda else "process RSS high-water mark",
        "reference_pass_peak_gib": bench_gpu.peak_memory_bytes(device) / 2**30, "engine_features": features,
        "engine_lacks": list(features["engine_lacks"]), "variants": {}}

    def hf_checkpointing(model):  # what a train.gradient_checkpointing switch would do, applied from outside
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.to(device)

    def standard_head(model):  # the answer head's per-model decision, set to "standard route" before its probe
        object.__setattr__(model, answer_head_decision, False)
        return model.to(device)

    variants = [("engine default", {}, None)]
    answer_head_decision = None
    if features["answer_head_module"]:
        from trainables import answer_head

        answer_head_decision = getattr(answer_head, "_DECISION", None)
    if answer_head_decision:
        variants.append(("full logits (the answer head turned off by this check)", {}, standard_head))
    else:
        details["engine_lacks"].append("the chunked log-prob head: not found, so no before/after")
    if features["gradient_checkpointing_key"]:
        key = features["gradient_checkpointing_key"].replace(".", "__")
        variants.append((f"{features['gradient_checkpointing_key']}: true", {key: True}, None))
    else:
        variants.append(("HF gradient checkpointing (non-reentrant), applied by this check: no engine switch",
                         {}, hf_checkpointing))
    details["logprob_head"] = ("engine default: trainables/answer_head.py, always on (no config key), probed once per "
                               "model; saved_vocab_sized_bytes counts (.., vocab)-shaped tensors kept for backward"
                               if answer_head_decision else "no chunked head in this build")
    for index, (label, extra, prepare) in enumerate(variants):
        variant_spec = engine_args(str(model_dir), str(pairs_file), output_dir=ctx.scratch / f"peak-{index + 1}",
                                   **settings, **extra)
        saved, rows = SavedForBackward(config.vocab_size, config.hidden_size), []
        started = time.perf_counter()

        def prepared(model, prepare=prepare):
            model = prepare(model) if prepare else model.to(device)
            saved.parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
            model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(tuple(kwargs["input_ids"].shape))
                                            if torch.is_grad_enabled() else None, with_kwargs=True)
            return model

        def report(metrics, checkpoint):
            saved.recording = False  # step 1's forward only
            losses.append(metrics.get("train/loss"))

        losses: list[float] = []
        gc.collect()
        bench_gpu.reset_peak_memory(device)
        try:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
                run_dpo(variant_spec.model, variant_spec.data, variant_spec.preference, variant_spec.loop,
                        variant_spec.runtime, report, prepare_model=prepared, data=data)
        except torch.cuda.OutOfMemoryError as error:
            details["variants"][label] = {"out_of_memory": str(error)[:300]}
            ctx.save(details)
            continue
        tokens, width = (rows[0][0], rows[0][1]) if rows else (0, 0)
        one_bf16_logits = tokens * width * config.vocab_size * 2  # (rows, seq, vocab) bf16 of step 1's forward
        kept = saved.summary()
        details["variants"][label] = {
            "peak_gib": bench_gpu.peak_memory_bytes(device) / 2**30, "seconds": round(time.perf_counter() - started, 1),
            "policy_forward_shape": rows[0] if rows else None, "losses": losses, **kept,
            "vocab_sized_saved_vs_one_bf16_logits": kept["saved_vocab_sized_bytes"] / max(one_bf16_logits, 1)}
        ctx.save(details)
    measured = [v for v in details["variants"].values() if "peak_gib" in v]
    return {"status": "passed" if len(measured) == len(variants) else "failed", "details": details}


def check_mfu(ctx: Context) -> dict[str, Any]:
    """bench/gpu.py's functions, a short run: shared / unshared engine against TRL precomputed."""
    import gpu as bench_gpu

    quiet()
    methods = "engine-precomputed-shared,engine-precomputed-unshared,trl-precomputed"
    out = bench_gpu.main(["--steps", "10", "--warmup", "3", "--methods", methods,
                          "--out", str(ctx.scratch / "mfu.json")])
    document = json.loads(Path(out).read_text())
    keys = ("pairs_per_second", "processed_tokens_per_second", "model_tflops", "mfu", "peak_memory_bytes", "layout",
            "vs_trl")
    rows = {method: {key: row.get(key) for key in keys} for method, row in document["summary"].items()}
    details = {"command": f"python bench/gpu.py --steps 10 --warmup 3 --methods {methods}", "rows": rows,
               "peak_tflops": document["machine"]["peak_tflops"], "peak_source": document["machine"]["peak_source"],
               "device": document["machine"]["device"]}
    return {"status": "passed" if set(rows) == set(methods.split(",")) else "failed", "details": details}


def gpu_processes() -> int | None:
    """Compute processes on the GPUs now (nvidia-smi), None when it cannot tell."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return len([line for line in listed.stdout.splitlines() if line.strip()]) if listed.returncode == 0 else None


def check_sweep(ctx: Context) -> dict[str, Any]:
    """`dpo sweep` on a local Ray: two grid trials, each worker asking for half the GPU."""
    import threading

    from orchestrator.cli.main import main as dpo

    quiet()
    storage = ctx.scratch / "sweep-runs"
    train, held_out = demo_pairs(ctx)
    sets = {"name": "gpu-check-sweep", "data.train": train, "data.eval": held_out, "storage_path": storage,
            "output_dir": ctx.scratch / "sweep-outputs", "tracking.enabled": "false", "sweep.strategy": "grid",
            "sweep.beta": "[0.1, 0.2]", "sweep.max_trials": 2, "train.max_steps": 30 if ctx.cuda else 10,
            "train.batch_size": 32 if ctx.cuda else 16, "train.eval_every": 10, "train.checkpoint_every": 30,
            "train.log_every": 5, "resources.num_workers": 1, "resources.cpus_per_worker": 1,
            "resources.use_gpu": "true" if ctx.cuda else "false", "resources.gpus_per_worker": 0.5}
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # how many processes hold a CUDA context, every half second
        while not done.wait(0.5):
            count = gpu_processes()
            if count is not None:
                samples.append(count)

    sampler = threading.Thread(target=sample, daemon=True)
    if ctx.cuda:
        sampler.start()
    started = time.perf_counter()
    try:
        code = dpo(["sweep", str(REPO / "configs" / "quickstart.yaml"), *cli_sets(sets)])
    finally:
        done.set()
    wall = time.perf_counter() - started
    summary = json.loads((storage / "gpu-check-sweep" / "sweep_summary.json").read_text())
    spans = []
    for trial in summary["trials"]:
        results = [json.loads(line) for line in (Path(trial["path"]) / "result.json").read_text().splitlines() if line]
        spans.append((min(r["timestamp"] - r["time_total_s"] for r in results), max(r["timestamp"] for r in results)))
    overlap = max(0.0, min(end for _, end in spans) - max(start for start, _ in spans)) if len(spans) == 2 else 0.0
    finished = [t for t in summary["trials"] if t["step"] == sets["train.max_steps"] and not t["error"]]
    details = {"command": shown("dpo sweep configs/quickstart.yaml", cli_sets(sets)), "exit_code": code,
               "wall_seconds": round(wall, 1),
               "trials": [{k: t[k] for k in ("trial_id", "config", "metric", "step", "error", "trial_seconds")}
                          for t in summary["trials"]],
               "trials_overlap_seconds": round(overlap, 1),
               "max_gpu_processes_seen": max(samples) if samples else None}
    seen = max(samples) if samples else 0  # 0: nvidia-smi lists no process (e.g. another PID namespace): unknown
    shared = overlap > 0 and (not ctx.cuda or seen == 0 or seen >= 2)
    ok = code == 0 and len(finished) == 2 and shared
    return {"status": "passed" if ok else "failed", "details": details}


CHECKS = (
    Check("environment", check_environment, (60, 60), (20, 20), "run"),
    Check("losses_precomputed", lambda ctx: train_losses(ctx, "precomputed"), (90, 90), (40, 30), "run"),
    Check("losses_live", lambda ctx: train_losses(ctx, "live"), (90, 90), (40, 30), "run"),
    Check("sdpa_mask", check_sdpa_mask, (60, 45), (20, 15), "smoke"),
    Check("fsdp", check_fsdp, (90, 60), (30, 20), "smoke"),
    Check("peak_memory", check_peak_memory, (150, 60), (60, 20), "smoke"),
    Check("mfu_vs_trl", check_mfu, (180, 0), (90, 0),
          "MFU means nothing on a CPU; `python bench/gpu.py` gives the CPU figures of the same methods"),
    Check("sweep", check_sweep, (180, 150), (90, 60), "run"),
)


# ---- the driver ----------------------------------------------------------------------------------------------

def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: the check ran past its timeout")  # finally blocks run (ray.shutdown)


def run_child(name: str, cuda: bool, scratch: Path, result_file: Path) -> None:
    signal.signal(signal.SIGTERM, interrupted)
    ctx = Context(cuda=cuda, scratch=scratch, result_file=result_file)
    check = next(c for c in CHECKS if c.name == name)
    try:
        result = check.run(ctx)
    except BaseException as error:  # noqa: BLE001 - reported, with its traceback, in the JSON
        previous = json.loads(result_file.read_text()).get("details", {}) if result_file.is_file() else {}
        result = {"status": "error", "details": previous, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()[-4000:]}
    write_json(result_file, result)


def run_check(check: Check, cuda: bool, timeout: float, scratch: Path) -> dict[str, Any]:
    """The check in its own process group, killed (SIGTERM, then SIGKILL) past `timeout`."""
    result_file, log_file = scratch / f"{check.name}.result.json", scratch / f"{check.name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--scratch", str(scratch),
               "--result", str(result_file), "--device", "cuda" if cuda else "cpu"]
    started = time.perf_counter()
    with log_file.open("w") as log:
        # CPU: one torch thread per process (on 2 shared, busy cores 2 threads ran a DPO step 2-10x slower than 1)
        env = os.environ if cuda else os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)  # the group this call started (start_new_session)
                    process.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    seconds = round(time.perf_counter() - started, 1)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"status": "error", "details": {}}
    if timed_out:
        result["status"] = "timeout"
        result["reason"] = f"still running after {timeout:.0f} s; details so far kept"
    elif result["status"] == "running":
        result["status"], result["reason"] = "error", f"the check's process ended with code {process.returncode}"
    if result["status"] in ("error", "timeout", "failed"):
        result["log_tail"] = log_file.read_text(errors="replace")[-3000:]
    return {"name": check.name, "seconds": seconds, **result}


def headline(entry: dict[str, Any]) -> str:
    details = entry.get("details", {})
    outcome = entry.get("smoke", entry["status"])
    if entry.get("reason") and not entry.get("smoke") and entry["status"] != "passed":
        note = entry["reason"]
    elif outcome == "timeout":
        note = "timed out"
    elif entry.get("error"):
        note = entry["error"]
    elif entry["name"].startswith("losses"):
        note = (f"step 1 {details.get('step1_loss', math.nan):.6f} "
                f"(ln 2 {details.get('step1_minus_ln2', math.nan):+.1e}), "
                f"first/last 5 {details.get('mean_first5', math.nan):.3f} -> {details.get('mean_last5', math.nan):.3f}")
    elif entry["name"] == "environment":
        note = f"torch {details.get('torch')}, CUDA {details.get('cuda_runtime')}, {details.get('gpu', 'no GPU')}"
    elif entry["name"] == "sdpa_mask":
        note = details.get("error") or f"ops {[n for n in details.get('attention_ops', []) if n.startswith('aten::_')]}"
    elif entry["name"] == "fsdp":
        note = f"{details.get('backend')}, resume difference {details.get('max_resume_difference', math.nan):.1e}"
    elif entry["name"] == "peak_memory":
        note = "; ".join(f"{k.split(' (')[0].split(',')[0][:26]}: {v.get('peak_gib', math.nan):.2f} GiB peak, "
                         f"{v.get('saved_bytes', math.nan) / 2**20:.0f} MiB saved"
                         for k, v in details.get("variants", {}).items())
    elif entry["name"] == "mfu_vs_trl":
        note = "; ".join(f"{k}: {'-' if v['mfu'] is None else format(v['mfu'], '.1%')}"
                         for k, v in details.get("rows", {}).items())
    elif entry["name"] == "sweep":
        note = (f"{len(details.get('trials', []))} trials, overlap {details.get('trials_overlap_seconds')} s, "
                f"GPU processes seen {details.get('max_gpu_processes_seen')}")
    else:
        note = ""
    if entry.get("smoke"):
        note = f"CPU smoke {entry['smoke']}: {note}"
    return note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--budget", type=float, help="seconds for all checks (default 450 on CUDA, 180 on CPU)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every check's timeout and minimum and the default budget (a busy machine)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(c.name for c in CHECKS)}")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/gpu_check-<date>.json)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (logs, models, runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.device == "cuda", args.scratch, args.result)
        return 0
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    scale = args.timeout_scale
    budget = args.budget or (450 if cuda else 180) * scale
    selected = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    out = args.out or REPO / "bench" / "results" / f"gpu_check-{datetime.date.today()}.json"
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    document: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                "command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
                                "device": "cuda" if cuda else "cpu", "budget_seconds": budget, "timeout_scale": scale,
                                "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                                "scratch": str(scratch),
                                "checks": [], "engine_lacks": [], "finished": None}
    started = time.perf_counter()
    slot = 0 if cuda else 1
    for check in selected:
        left = budget - (time.perf_counter() - started)
        if not cuda and check.on_cpu not in ("run", "smoke"):
            entry = {"name": check.name, "status": "skipped", "seconds": 0, "reason": f"no CUDA: {check.on_cpu}"}
        elif left < check.minimum[slot] * scale:
            entry = {"name": check.name, "status": "skipped", "seconds": 0,
                     "reason": f"time: {left:.0f} s of the {budget:.0f} s budget left, it needs "
                               f"{check.minimum[slot] * scale:.0f}"}
        else:
            timeout = min(check.timeout[slot] * scale, left)
            print(f"[{time.perf_counter() - started:5.0f} s] {check.name} (timeout {timeout:.0f} s) ...", flush=True)
            entry = run_check(check, cuda, timeout, scratch)
            if not cuda and check.on_cpu == "smoke":
                entry["smoke"] = entry["status"]
                entry["status"] = "skipped"
                entry["reason"] = "no CUDA: the claim is about the GPU path; its code ran at small size on the CPU"
        document["checks"].append(entry)
        for lack in entry.get("details", {}).get("engine_lacks", []) + \
                entry.get("details", {}).get("engine_features", {}).get("engine_lacks", []):
            if lack not in document["engine_lacks"]:
                document["engine_lacks"].append(lack)
        write_json(out, document)
        line = f"[{time.perf_counter() - started:5.0f} s] {check.name}: {entry['status']} {headline(entry)}"
        print(line[:300], flush=True)
    document["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    document["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, document)
    print(f"\n{'check':<20}{'status':<10}{'seconds':>8}  result")
    for entry in document["checks"]:
        print(f"{entry['name']:<20}{entry['status']:<10}{entry['seconds']:>8}  {headline(entry)}"[:220])
    if document["engine_lacks"]:
        print("engine lacks: " + "; ".join(document["engine_lacks"]))
    print(f"total {document['total_seconds']} s on {document['device']}; wrote {out}"
          + ("" if args.keep_scratch else f" (scratch {scratch} removed)"))
    if not args.keep_scratch:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    failed = [e for e in document["checks"] if e["status"] in ("failed", "error", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
