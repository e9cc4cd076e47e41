"""MFU, tokens/s and peak memory of one DPO optimizer step on one GPU: this engine vs TRL's DPOTrainer.

    python bench/gpu.py                          # CUDA: Qwen2-0.5B-shaped model, 1024 tokens, bf16, sdpa, batch 8;
                                                 # no GPU: a small model at 128 tokens (about 1 min, 2 CPU cores)
    python bench/gpu.py --model-size 0.5b --seq-len 1024 --batch-size 8 --steps 20 --warmup 5 --compile
    python bench/gpu.py --methods engine-precomputed-shared,trl-precomputed --attn flash_attention_2 --peak-tflops 989.5

The model is a random-init Llama built in code (no hub access): `0.5b` has Qwen2-0.5B's dimensions (hidden 896,
24 layers, 14 query / 2 KV heads, MLP 4864, vocab 151936, tied embeddings; Qwen2 adds q/k/v biases, a rounding
error in FLOPs); `small` is hidden 128, 2 layers, vocab 4096. Llama rather than Qwen2 because transformers 5 loads
a Qwen2 model folder with Qwen2's own tokenizer class, whatever tokenizer the folder holds.
The pairs are random token ids written as words of a WordLevel tokenizer ("t17 t4093 ..."), so that every
trainer tokenises them back to exactly the sampled ids: a prompt of seq_len // 4 tokens and two answers that,
with the eos both trainers append, fill the row to seq_len. Every row has the same length: no padding.
The methods and their timing are bench/throughput.py's (imported, not copied): engine-* is DPOObjective +
run_training_loop, trl-* is trl.DPOTrainer, bound-dense is plain next-token training. This script adds the engine
with train.share_prompt forced on (`-shared`: one [prompt | chosen | rejected] row per pair, 1.75 S tokens) next to
`-unshared` (false: two rows of S tokens, the prompt computed twice).

Model FLOPs are counted from what each method really runs (PaLM, Chowdhery et al. 2022, appendix B, applied to the
rows and positions executed): a forward pre-hook on every model this script loads reads each forward's input (rows,
real tokens per row from its 2D mask, or from the shared layout's position ids), and a forward hook on its output
layer counts the positions that layer projects. A row of T real tokens, of which H go through the LM head, costs
    forward 2 N_body T + 2 N_head H + 4 L d T^2    N_body = weights of every nn.Linear but the LM head, N_head = the
    training 3 x forward                           LM head's (once, tied or not), L layers, d = heads x head_dim;
                                                   embedding lookups are free
(training: a forward with grad in train mode, whose backward costs twice the forward; recomputation, such as the
engine's answer head redoing its logits chunks in backward, is not counted). So the shared-prompt engine is credited
1.75 S tokens per pair and its longer rows' attention, the standard layout 2 S; the engine's answer head
(trainables/answer_head.py) and TRL's fused head project only the answer-predicting positions (TRL off CUDA: every
position), bound-dense every position. A live reference adds its forwards; a precomputed one nothing (its pass is
timed apart). TRL builds its live reference itself (no hook): its forwards are counted as forwards over the policy's
rows, which TRL feeds it. Attention is counted in full, as PaLM does (a causal kernel skips about half of it).
MFU = executed model FLOP/s / peak FLOP/s, the peak being the datasheet's dense bf16 figure for the GPU's name
(--peak-tflops overrides it); on a CPU there is no such figure: MFU is shown against a measured fp32 torch.matmul
rate, and is not meaningful. Peak memory per method: torch.cuda.max_memory_allocated, reset before it; on a CPU the
process's RSS high-water mark (VmHWM), reset before it through /proc/self/clear_refs. Never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import throughput  # noqa: E402
from throughput import METHODS, Inputs, Measurement, engine_run, machine_info, summarize  # noqa: E402
from trainables.data import PreferencePair  # noqa: E402
from trainables.entrypoints import tokenizer_for  # noqa: E402
from trainables.modeling import load_causal_lm, resolve_device  # noqa: E402
from trainables.tokenization import pair_token_count, tokenize_pairs  # noqa: E402

MODEL_SHAPES: dict[str, dict[str, int]] = {  # LlamaConfig arguments
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),  # Qwen2-0.5B
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=4096),
}
RUN_DEFAULTS = {"0.5b": dict(seq_len=1024, batch_size=8, steps=20, warmup=5),  # per model size, unless a flag says
                "small": dict(seq_len=128, batch_size=4, steps=20, warmup=3)}
GPU_METHODS = METHODS + ("engine-precomputed-shared", "engine-live-shared", "engine-live-unshared")
DEFAULT_METHODS = ("engine-precomputed-shared,engine-precomputed-unshared,engine-live-shared,trl-precomputed,trl-live,"
                   "bound-dense")
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2; word "t<i>" is token id i for i >= 3
# Dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s; the first key contained in torch.cuda.get_device_name wins, so
# longer names come first ("A100" before "A10G" before "A10", "L40S" before "L4", "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),  # H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet):
    ("H100 NVL", 835.0),   # BF16 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS "with sparsity": halved here
    ("H100", 989.5),       # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),   # H200 page (nvidia.com/en-us/data-center/h200): BF16 1,979 (SXM) / 1,671 (NVL) with sparsity
    ("H200", 989.5),       # H200 SXM (same Hopper tensor cores and clocks as H100 SXM)
    ("H800", 989.5),
    ("B200", 2250.0),      # DGX B200 datasheet: 72 PFLOPS FP16/BF16 for 8 GPUs, with sparsity -> 2,250 dense per GPU
    ("A100", 312.0),       # A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 312 | 624 sparse
    ("A10G", 70.0),        # AWS's A10G (EC2 G5): no NVIDIA datasheet; the AWS/NVIDIA A10G sheet and independent tables
                           # give 70 dense FP16/BF16 tensor TFLOPS, not the A10's 125. Unverified on hardware here:
                           # check with --peak-tflops against a measured bf16 matmul on a g5 before quoting an MFU.
    ("A10", 125.0),        # A10 datasheet (nvidia.com/.../a10/pdf/a10-datasheet.pdf): BF16 125 | 250 sparse
    ("L40S", 362.0),       # L40S datasheet: BF16 362.05 | 733 sparse
    ("L4", 121.0),         # L4 datasheet (resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet): 242 sparse
    ("RTX 4090", 165.2),   # Ada whitepaper: FP16/BF16 tensor with FP32 accumulate 165.2 | 330.4 sparse
)


@dataclass(frozen=True)
class FlopCounter:
    """Model FLOPs of a forward over rows of real tokens (PaLM appendix B); see the module docstring."""

    body_parameters: int  # N_body: weights of every nn.Linear but the output layer
    head_parameters: int  # N_head: the output layer (LM head), once, tied or not
    layers: int  # L
    attention_width: int  # d = heads x head_dim

    def forward(self, tokens: float, squared_lengths: float, head_positions: float) -> float:
        """tokens = sum of T over the rows, squared_lengths = sum of T^2 (QK^T and AV), head_positions = the
        positions the output layer projects (every position, or only those predicting answer tokens)."""
        return (2 * self.body_parameters * tokens + 2 * self.head_parameters * head_positions
                + 4 * self.layers * self.attention_width * squared_lengths)


class FlopMeter:
    """What every hooked model really ran, per forward: [time, training, real tokens per row, head positions].

    A forward pre-hook on the model reads its input; a forward hook on its output layer counts the positions
    it projects ((rows, seq, vocab) logits, or the engine's answer head's (1, N, 1) log-probs). TRL's fused
    head reads the output layer's weight without calling it: its positions come from the labels it is given.
    Counts stay on the device until read (no synchronisation inside timed steps)."""

    def __init__(self, flops: FlopCounter):
        self.flops, self.records = flops, []

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(torch.compiler.disable(self._record), with_kwargs=True)
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_hook(torch.compiler.disable(self._head))

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            training = torch.is_grad_enabled() and module.training  # a backward will follow
            lengths = row_lengths(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            self.records.append([time.perf_counter(), training, lengths, trl_head_positions(kwargs)])

    def _head(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.records and torch.is_tensor(output):
            vocab = getattr(module, "out_features", None)
            positions = output.numel() // vocab if output.shape[-1] == vocab else output.numel()
            self.records[-1][3] = (self.records[-1][3] or 0) + positions

    def window(self, start: float, end: float, live_reference_unhooked: bool) -> dict[str, float]:
        """Executed model FLOPs, policy rows and tokens of the forwards launched in [start, end)."""
        totals = dict(flops=0.0, policy_rows=0, policy_tokens=0)
        for stamp, training, lengths, head in self.records:
            if not start <= stamp < end:
                continue
            lengths = lengths.double().cpu()  # (rows,)
            tokens = float(lengths.sum())
            forward = self.flops.forward(tokens, float((lengths**2).sum()), tokens if head is None else float(head))
            totals["flops"] += forward * ((4 if live_reference_unhooked else 3) if training else 1)
            if training:
                totals["policy_rows"] += len(lengths)
                totals["policy_tokens"] += tokens
        return totals


def trl_head_positions(kwargs: dict[str, Any]) -> torch.Tensor | int | None:
    """Positions TRL's fused LM head scores (trl/trainer/utils.py add_fused_lm_head): with Triton on CUDA only
    those whose next-token label is not -100, elsewhere every position but the last; None: not TRL's call."""
    labels = kwargs.get("labels")
    if not kwargs.get("fused_lm_head") or labels is None:
        return None
    shifted = labels[:, 1:]  # (rows, seq - 1)
    try:
        from trl.kernels.chunked_logprob import _use_triton
        compact = _use_triton(labels.device)
    except ImportError:  # another TRL layout: assume the compact (answer positions only) route
        compact = True
    return (shifted != -100).sum() if compact else shifted.numel()


def row_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
    """Real tokens per row (rows,): from a 2D padding mask; under the shared layout's 4D mask from its position
    ids (real tokens first, pads after them at position 0); else every column."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.sum(-1)
    if attention_mask is not None and position_ids is not None:
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        return (columns * (position_ids > 0)).amax(-1) + 1  # (rows,)
    return torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)


@dataclass
class BenchInputs(Inputs):
    """throughput.Inputs with this script's attention kernel, an optional torch.compile and the FLOP meter."""

    attn_implementation: str = "sdpa"
    compile_policy: bool = False
    meter: FlopMeter | None = None

    def load_model(self, policy: bool = True) -> torch.nn.Module:
        model = load_causal_lm(self.model_dir, attn_implementation=self.attn_implementation)
        if self.meter is not None:
            self.meter.attach(model)
        if policy and self.compile_policy:
            model.compile()  # in place: the trainers still save and unwrap the same module
        return model


class RecordedClock(throughput.StepClock):
    """throughput's step clock, remembered so that the FLOP window can be read from its marks."""

    last: "RecordedClock | None" = None

    def __init__(self, device: torch.device):
        super().__init__(device)
        RecordedClock.last = self


throughput.StepClock = RecordedClock  # throughput's runners build their clock by this name


def _engine_run_never_is_last_step(model_dir: str, data: str = "in-memory pairs", **settings: Any):
    """throughput.engine_run, with "never" (eval/checkpoint every 10**9 steps, over the schema's cap since the config
    bounds step counts) said as "at the last step", which the loop does anyway. Remove once throughput.py says so."""
    for key in ("train__eval_every", "train__checkpoint_every"):
        if key in settings and "train__max_steps" in settings:
            settings[key] = min(settings[key], settings["train__max_steps"])
    return _throughput_engine_run(model_dir, data, **settings)


_throughput_engine_run, throughput.engine_run = throughput.engine_run, _engine_run_never_is_last_step


@contextlib.contextmanager
def share_prompt_forced():
    """throughput.run_engine with train.share_prompt true (it runs auto or false): policy and live reference."""
    objective, reference = throughput.TimedDPOObjective, throughput.LiveReference

    class ForcedObjective(objective):
        def __init__(self, clock, **kwargs):
            super().__init__(clock, **(kwargs | {"share_prompt": True}))

    class ForcedReference(reference):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **(kwargs | {"share_prompt": True}))

    throughput.TimedDPOObjective, throughput.LiveReference = ForcedObjective, ForcedReference
    try:
        yield
    finally:
        throughput.TimedDPOObjective, throughput.LiveReference = objective, reference


def run_gpu_method(method: str, inputs: BenchInputs, args: argparse.Namespace, repeat: int) -> Measurement:
    if not method.endswith("-shared"):
        return throughput.run_method(method, inputs, args, repeat)
    with share_prompt_forced():  # run_engine reads "-shared" as auto; the patch makes it true
        return throughput.run_method(method, inputs, args, repeat)


def llama_config(model_size: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL_SHAPES[model_size], max_position_embeddings=max(seq_len, 4096), tie_word_embeddings=True,
                       pad_token_id=0, eos_token_id=1, bos_token_id=None, use_cache=False)


def flop_counter(config) -> FlopCounter:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight
    linear_weights = {id(m.weight): m.weight.numel() for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and m.weight is not head}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopCounter(sum(linear_weights.values()), head.numel(), config.num_hidden_layers,
                       config.num_attention_heads * head_dim)


def write_model_and_tokenizer(directory: Path, config, device: torch.device) -> None:
    """A random-init causal LM of `config` and a WordLevel tokenizer whose words are its token ids, in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B weights is much faster on the GPU
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{index}": index for index in range(len(SPECIAL_TOKENS), config.vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synthetic_pairs(count: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[PreferencePair]:
    """Random prompt (seq_len // 4 tokens) + two random answers filling the row to seq_len with the eos."""
    prompt_tokens = seq_len // 4
    answer_tokens = seq_len - prompt_tokens - 1  # the eos that both trainers append
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (count, prompt_tokens + 2 * answer_tokens),
                        generator=generator).tolist()  # (pairs, prompt + chosen + rejected)
    words = lambda token_ids: " ".join(f"t{token}" for token in token_ids)
    return [PreferencePair(prompt=words(row[:prompt_tokens]),  # answers start with a space: TRL tokenises prompt+answer
                           chosen=" " + words(row[prompt_tokens : prompt_tokens + answer_tokens]),
                           rejected=" " + words(row[prompt_tokens + answer_tokens :])) for row in ids]


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from): --peak-tflops, the datasheet table, or a measured CPU matmul rate."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = next(((key, tflops) for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
        if found is None:
            return None, f"unknown GPU {name!r}: pass --peak-tflops"
        return found[1], f"datasheet dense bf16 for {name!r} (table key {found[0]!r})"
    size, count, started = 1024, 0, time.perf_counter()
    left, right = torch.randn(size, size), torch.randn(size, size)  # (size, size) each, fp32
    while time.perf_counter() - started < 1.0:
        left @ right
        count += 1
    rate = 2 * size**3 * count / (time.perf_counter() - started) / 1e12
    return rate, "measured fp32 torch.matmul 1024x1024 on this CPU (not a datasheet peak; MFU not meaningful)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the peak allocated since the last reset; CPU: the RSS high-water mark (VmHWM, or ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; never reset


def add_efficiency(rows: dict[str, dict[str, Any]], executed: dict[str, list[dict[str, float]]], peak: float | None,
                   peak_memory: dict[str, int]) -> None:
    """Adds executed model TFLOP/s, MFU, processed tokens/s, layout, peak memory and a like-for-like TRL ratio."""
    for method, row in rows.items():
        runs = executed[method]  # one per repeat: flops, seconds, policy_rows, policy_tokens, pairs
        row["model_flops_per_pair"] = statistics.median(r["flops"] / r["pairs"] for r in runs)
        row["model_tflops"] = statistics.median(r["flops"] / r["seconds"] for r in runs) / 1e12
        row["mfu"] = row["model_tflops"] / peak if peak else None
        row["processed_tokens_per_second"] = statistics.median(r["policy_tokens"] / r["seconds"] for r in runs)
        row["policy_rows_per_pair"] = statistics.median(r["policy_rows"] / r["pairs"] for r in runs)
        row["processed_tokens_per_pair"] = statistics.median(r["policy_tokens"] / r["pairs"] for r in runs)
        row["layout"] = "one row per pair" if row["policy_rows_per_pair"] == 1 else "two rows per pair"
        row["peak_memory_bytes"] = peak_memory[method]
        live = "-live" in method
        row["vs_trl"] = row["vs_trl_live"] if live else row["vs_trl_precomputed"]  # bound: vs TRL precomputed


def format_table(rows: dict[str, dict[str, Any]], memory_label: str) -> str:
    cell = lambda value, pattern: "-" if value is None else pattern.format(value)
    lines = [f"{'method':<28}{'pairs/s':>9}{'tokens/s':>10}{'run tok/s':>11}{'TFLOP/s':>10}{'MFU':>8}"
             f"{memory_label:>16}{'vs TRL':>8}"]
    for method, row in rows.items():
        lines.append(f"{method:<28}{row['pairs_per_second']:>9.2f}{row['tokens_per_second']:>10.0f}"
                     f"{row['processed_tokens_per_second']:>11.0f}{row['model_tflops']:>10.3f}"
                     f"{cell(row['mfu'], '{:.1%}'):>8}{row['peak_memory_bytes'] / 2**30:>12.2f} GiB"
                     f"{cell(row['vs_trl'], '{:.2f}x'):>8}")
    return "\n".join(lines + [
        "tokens/s: the pairs' tokens, prompt counted twice (the same unit for every method); run tok/s: the tokens the "
        "policy really ran (one row per pair: the prompt once); TFLOP/s and MFU: from the rows really run",
        "vs TRL: pairs/s against the TRL row with the same reference (live or precomputed); bound-dense against TRL "
        "precomputed"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SHAPES), help="default: 0.5b on CUDA, small on CPU")
    parser.add_argument("--seq-len", type=int, help="tokens per row (prompt+answer); default 1024 (0.5b), 128 (small)")
    parser.add_argument("--batch-size", type=int, help="pairs per optimizer step (2 rows each); default 8 / 4 (small)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps; default 20")
    parser.add_argument("--warmup", type=int, help="untimed steps before them; default 5 (0.5b), 3 (small)")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions per method (round-robin); medians shown")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated subset of {','.join(GPU_METHODS)}")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="bf16 = bf16 autocast over fp32 weights and AdamW (as `dpo train`); auto: bf16 on CUDA")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention kernel of every model (flash_attention_2 needs CUDA and flash-attn)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the policy (every method)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: table by GPU name)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate, every method")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss)")
    parser.add_argument("--threads", type=int, help="torch CPU threads; default 1 on CPU (on 2 shared, busy cores "
                        "2 threads ran 10x slower than 1), every core with CUDA")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="keep TRL's default checkpointing")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/gpu-<date>-<device>.json)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in GPU_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(GPU_METHODS)}")
    args.device = resolve_device(args.device)
    if args.attn == "flash_attention_2" and args.device.type != "cuda":
        parser.error("--attn flash_attention_2 needs a CUDA device; use sdpa or eager on CPU")
    args.model_size = args.model_size or ("0.5b" if args.device.type == "cuda" else "small")
    for name, value in RUN_DEFAULTS[args.model_size].items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    args.threads = args.threads or (1 if args.device.type == "cpu" else os.cpu_count())
    args.max_length = args.seq_len  # throughput.run_trl reads it; nothing is cut
    args.padding_buckets = "auto"  # throughput.run_engine reads it; rows of one length: always one bucket
    return args


def build_inputs(args: argparse.Namespace, model_dir: Path, config, meter: FlopMeter) -> BenchInputs:
    write_model_and_tokenizer(model_dir, config, args.device)
    tokenizer = tokenizer_for(engine_run(str(model_dir)).model)
    pairs = synthetic_pairs(args.batch_size * (args.warmup + args.steps + 1), args.seq_len, config.vocab_size)
    tokenized = tokenize_pairs(pairs, tokenizer, args.seq_len)  # (prompt, chosen + eos, rejected + eos) ids
    if any(pair_token_count(pair) != 2 * args.seq_len for pair in tokenized):
        raise RuntimeError(f"synthetic pairs did not tokenise to rows of exactly {args.seq_len} tokens")
    cuda_bf16 = args.device.type == "cuda" and torch.cuda.is_bf16_supported()
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and cuda_bf16)
    return BenchInputs(model_dir=str(model_dir), tokenizer=tokenizer, pairs=pairs, tokenized=tokenized,
                       device=args.device, autocast_dtype=torch.bfloat16 if bf16 else None,
                       attn_implementation=args.attn, compile_policy=args.compile, meter=meter)


def measure(inputs: BenchInputs, args: argparse.Namespace
            ) -> tuple[list[Measurement], dict[str, list[dict[str, float]]], dict[str, int]]:
    """Every method --repeats times, round-robin; executed FLOPs per run; the highest peak memory per method."""
    measurements: list[Measurement] = []
    executed: dict[str, list[dict[str, float]]] = {}
    peak_memory: dict[str, int] = {}
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            gc.collect()  # the last method's models are gone before this one's peak is read
            reset_peak_memory(inputs.device)
            inputs.meter.records.clear()
            torch.set_num_threads(args.threads)
            try:
                run = run_gpu_method(method, inputs, args, repeat)
            except torch.cuda.OutOfMemoryError:  # the other methods still run; lower --batch-size to see this one
                print(f"repeat {repeat} {method:<28} out of GPU memory at batch {args.batch_size}", flush=True)
                continue
            run.method = method
            measurements.append(run)
            marks = RecordedClock.last.marks
            window = inputs.meter.window(marks[args.warmup], marks[args.warmup + args.steps],
                                         live_reference_unhooked=method == "trl-live")
            executed.setdefault(method, []).append(window | {"seconds": run.seconds, "pairs": run.pairs})
            peak_memory[method] = max(peak_memory.get(method, 0), peak_memory_bytes(inputs.device))
            print(f"repeat {repeat} {method:<28} {run.pairs_per_second:8.2f} pairs/s ({run.seconds:.2f} s for "
                  f"{run.steps} steps), {window['flops'] / run.seconds / 1e12:.3f} TFLOP/s, peak memory "
                  f"{peak_memory[method] / 2**30:.2f} GiB", flush=True)
    return measurements, executed, peak_memory


def write_report(rows: dict[str, dict[str, Any]], measurements: list[Measurement], info: dict[str, Any],
                 args: argparse.Namespace, flops: FlopCounter) -> Path:
    """Prints the table and the FLOP accounting, writes the JSON; returns its path."""
    cpu = args.device.type == "cpu"
    print("\n" + format_table(rows, "peak RSS" if cpu else "peak alloc"))
    shared_row = args.seq_len // 4 + 2 * (args.seq_len - args.seq_len // 4)
    print(f"peak: {info['peak_source']}\nexecuted FLOPs: a row of T real tokens, H of them through the LM head, costs "
          f"2 N_body T + 2 N_head H + 4 L d T^2 forward, 3x that in training; N_body = {flops.body_parameters:,}, "
          f"N_head = {flops.head_parameters:,}, L = {flops.layers}, d = {flops.attention_width}; per pair: two rows "
          f"of S = {args.seq_len}, or one row of {shared_row} with the shared prompt")
    headline = rows.get("engine-precomputed-shared")
    if not cpu and args.model_size == "0.5b" and args.seq_len == 1024 and headline:
        mfu = headline["mfu"]
        print(f"issue 8 target, one H100, 0.5B at 1024 tokens: engine >= 40% MFU; engine-precomputed-shared measured "
              f"{'-' if mfu is None else f'{mfu:.1%}'} on {info['device']}")
    device_name = "cpu" if cpu else torch.cuda.get_device_name(args.device)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu-{datetime.date.today()}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": info, "summary": rows, "runs": [asdict(m) for m in measurements]}
    out.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwrote {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Writing model shards"
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    config = llama_config(args.model_size, args.seq_len)
    flops = flop_counter(config)
    peak, peak_source = peak_tflops(args.device, args.peak_tflops)
    shape = MODEL_SHAPES[args.model_size]
    if args.device.type == "cpu":
        print(f"CPU run: {args.model_size} model (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
              f"vocab {shape['vocab_size']}), seq {args.seq_len}, batch {args.batch_size}. MFU is not meaningful on a "
              f"CPU: it is shown against a measured fp32 matmul rate ({peak:.3f} TFLOP/s), not a datasheet peak. "
              "Peak memory is the process's RSS high-water mark, reset before each method.")
    with tempfile.TemporaryDirectory() as scratch:
        inputs = build_inputs(args, Path(scratch) / "model", config, FlopMeter(flops))
        info = machine_info(inputs, args) | {
            "model": f"random-init Llama, {args.model_size}: {shape}", "attention": args.attn, "compile": args.compile,
            "peak_tflops": peak, "peak_source": peak_source, "flops": asdict(flops),
        }
        print(json.dumps({k: v for k, v in info.items() if k != "settings"}, default=str))
        measurements, executed, peak_memory = measure(inputs, args)
    rows = summarize(measurements)
    add_efficiency(rows, executed, peak, peak_memory)
    return write_report(rows, measurements, info, args, flops)


if __name__ == "__main__":
    main()
