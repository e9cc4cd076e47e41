"""MFU, tokens/s and peak memory of one DPO optimizer step on one GPU: this engine vs TRL's DPOTrainer.

    python bench/gpu.py                          # CUDA: Qwen2-0.5B-shaped model, 1024 tokens, bf16, sdpa, batch 8;
                                                 # no GPU: a small model at 128 tokens (about 1 min, 2 CPU cores)
    python bench/gpu.py --model-size 0.5b --seq-len 1024 --batch-size 8 --steps 20 --warmup 5 --compile
    python bench/gpu.py --methods engine-precomputed,trl-precomputed --attn flash_attention_2 --peak-tflops 989.5

The model is a random-init Llama built in code (no hub access): `0.5b` has Qwen2-0.5B's dimensions (hidden 896,
24 layers, 14 query / 2 KV heads, MLP 4864, vocab 151936, tied embeddings; Qwen2 adds q/k/v biases, a rounding
error in FLOPs); `small` is hidden 128, 2 layers, vocab 4096. Llama rather than Qwen2 because transformers 5 loads
a Qwen2 model folder with Qwen2's own tokenizer class, whatever tokenizer the folder holds.
The pairs are random token ids written as words of a WordLevel tokenizer ("t17 t4093 ..."), so that every
trainer tokenises them back to exactly the sampled ids: a prompt of seq_len // 4 tokens and two answers that,
with the eos both trainers append, fill the row to seq_len. Every row has the same length: no padding, so
real tokens == padded tokens. The methods and their timing are bench/throughput.py's (imported, not copied):
engine-* is DPOObjective + run_training_loop, trl-* is trl.DPOTrainer, bound-dense is plain next-token training.

Model FLOPs (PaLM, Chowdhery et al. 2022, appendix B), per real token of a row of S tokens through the policy:
    training  6 N + 12 L d S      N = weights of every nn.Linear, the LM head included once (tied or not);
    reference 2 N +  4 L d S      embedding lookups are free; L layers; d = heads x head_dim; S = row length
A live reference adds its forward; a precomputed one adds nothing (its pass is timed apart). Attention is counted
in full, as PaLM does (a causal kernel skips about half of it). MFU = tokens/s x FLOPs per token / peak FLOP/s;
the peak is the datasheet's dense bf16 figure for the GPU's name (--peak-tflops overrides it). On a CPU there is
no such figure: MFU is shown against a measured fp32 torch.matmul rate, and is not meaningful.
Peak memory is torch.cuda.max_memory_allocated over one method's run (load, precompute, warmup, timed steps),
reset before it; on a CPU the process's peak RSS, which cannot be reset per method. Never a test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from throughput import METHODS, Inputs, Measurement, engine_run, machine_info, run_method, summarize  # noqa: E402
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
DEFAULT_METHODS = "engine-precomputed,engine-live,trl-precomputed,trl-live,bound-dense"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2; word "t<i>" is token id i for i >= 3
# Dense bf16 tensor-core TFLOP/s from the datasheets (no sparsity); the first name contained in the GPU's wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.5), ("H200", 989.5), ("H800", 989.5),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2))


@dataclass
class BenchInputs(Inputs):
    """throughput.Inputs with this script's attention kernel and an optional torch.compile of the policy."""

    attn_implementation: str = "sdpa"
    compile_policy: bool = False

    def load_model(self, policy: bool = True) -> torch.nn.Module:
        model = load_causal_lm(self.model_dir, attn_implementation=self.attn_implementation)
        if policy and self.compile_policy:
            model.compile()  # in place: the trainers still save and unwrap the same module
        return model


@dataclass(frozen=True)
class FlopCounter:
    """Model FLOPs per real token (PaLM appendix B); see the module docstring."""

    matmul_parameters: int  # N
    layers: int  # L
    attention_width: int  # d = heads x head_dim

    def per_token(self, row_length: float, live_reference: bool) -> float:
        attention = self.layers * self.attention_width * row_length  # L d S: QK^T and AV, forward, per token
        training = 6 * self.matmul_parameters + 12 * attention
        return training + (2 * self.matmul_parameters + 4 * attention if live_reference else 0.0)


def llama_config(model_size: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL_SHAPES[model_size], max_position_embeddings=max(seq_len, 4096), tie_word_embeddings=True,
                       pad_token_id=0, eos_token_id=1, bos_token_id=None, use_cache=False)


def flop_counter(config) -> FlopCounter:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    linear_weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopCounter(sum(linear_weights.values()), config.num_hidden_layers, config.num_attention_heads * head_dim)


def write_model_and_tokenizer(directory: Path, config, device: torch.device) -> None:
    """A random-init Llama causal LM and a WordLevel tokenizer whose words are its token ids, saved to `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B weights is much faster on the GPU
        LlamaForCausalLM(config).save_pretrained(directory)
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
        found = next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
        return found, f"datasheet dense bf16 for {name!r}" if found else f"unknown GPU {name!r}: pass --peak-tflops"
    size, count, started = 1024, 0, time.perf_counter()
    left, right = torch.randn(size, size), torch.randn(size, size)  # (size, size) each, fp32
    while time.perf_counter() - started < 1.0:
        left @ right
        count += 1
    rate = 2 * size**3 * count / (time.perf_counter() - started) / 1e12
    return rate, "measured fp32 torch.matmul 1024x1024 on this CPU (not a datasheet peak; MFU not meaningful)"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; never reset


def add_efficiency(rows: dict[str, dict[str, Any]], flops: FlopCounter, peak: float | None,
                   peak_memory: dict[str, int]) -> None:
    """Adds model TFLOP/s, MFU, peak memory and a like-for-like TRL ratio to throughput.summarize's rows."""
    for method, row in rows.items():
        live = method.endswith("-live")
        row["row_length"] = row["real_tokens_per_pair"] / 2  # S: every row has the same length
        row["model_flops_per_token"] = flops.per_token(row["row_length"], live)
        row["model_tflops"] = row["tokens_per_second"] * row["model_flops_per_token"] / 1e12
        row["mfu"] = row["model_tflops"] / peak if peak else None
        row["peak_memory_bytes"] = peak_memory[method]
        row["vs_trl"] = row["vs_trl_live"] if live else row["vs_trl_precomputed"]  # bound: vs TRL precomputed


def format_table(rows: dict[str, dict[str, Any]], memory_label: str) -> str:
    cell = lambda value, pattern: "-" if value is None else pattern.format(value)
    lines = [f"{'method':<20}{'pairs/s':>9}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}{memory_label:>16}{'vs TRL':>8}"]
    for method, row in rows.items():
        lines.append(f"{method:<20}{row['pairs_per_second']:>9.2f}{row['tokens_per_second']:>11.0f}"
                     f"{row['model_tflops']:>10.3f}{cell(row['mfu'], '{:.1%}'):>8}"
                     f"{row['peak_memory_bytes'] / 2**30:>12.2f} GiB{cell(row['vs_trl'], '{:.2f}x'):>8}")
    return "\n".join(lines + ["vs TRL: against the TRL row with the same reference (live or precomputed); "
                              "bound-dense against TRL precomputed"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SHAPES), help="default: 0.5b on CUDA, small on CPU")
    parser.add_argument("--seq-len", type=int, help="tokens per row (prompt+answer); default 1024 (0.5b), 128 (small)")
    parser.add_argument("--batch-size", type=int, help="pairs per optimizer step (2 rows each); default 8 / 4 (small)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps; default 20")
    parser.add_argument("--warmup", type=int, help="untimed steps before them; default 5 (0.5b), 3 (small)")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions per method (round-robin); medians shown")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated subset of {','.join(METHODS)}")
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
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
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


def build_inputs(args: argparse.Namespace, model_dir: Path, config) -> BenchInputs:
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
                       attn_implementation=args.attn, compile_policy=args.compile)


def measure(inputs: BenchInputs, args: argparse.Namespace) -> tuple[list[Measurement], dict[str, int]]:
    """Every method --repeats times, round-robin; the highest peak memory per method."""
    measurements: list[Measurement] = []
    peak_memory: dict[str, int] = {}
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            gc.collect()  # the last method's models are gone before this one's peak is read
            if inputs.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(inputs.device)
            torch.set_num_threads(args.threads)
            try:
                measurements.append(run := run_method(method, inputs, args, repeat))
            except torch.cuda.OutOfMemoryError:  # the other methods still run; lower --batch-size to see this one
                print(f"repeat {repeat} {method:<20} out of GPU memory at batch {args.batch_size}", flush=True)
                continue
            peak_memory[method] = max(peak_memory.get(method, 0), peak_memory_bytes(inputs.device))
            print(f"repeat {repeat} {method:<20} {run.pairs_per_second:8.2f} pairs/s ({run.seconds:.2f} s for "
                  f"{run.steps} steps), peak memory {peak_memory[method] / 2**30:.2f} GiB", flush=True)
    return measurements, peak_memory


def write_report(rows: dict[str, dict[str, Any]], measurements: list[Measurement], info: dict[str, Any],
                 args: argparse.Namespace, flops: FlopCounter) -> None:
    """Prints the table and the FLOP accounting, writes the JSON."""
    cpu = args.device.type == "cpu"
    print("\n" + format_table(rows, "peak RSS" if cpu else "peak alloc"))
    print(f"peak: {info['peak_source']}\nFLOPs per token = 6N + 12LdS (+ 2N + 4LdS with a live reference), "
          f"N = {flops.matmul_parameters:,}, L = {flops.layers}, d = {flops.attention_width}, S = {args.seq_len} "
          "real tokens per row (no padding)")
    if not cpu and args.model_size == "0.5b" and args.seq_len == 1024 and rows.get("engine-precomputed"):
        mfu = rows["engine-precomputed"]["mfu"]
        print(f"issue 8 target, one H100, 0.5B at 1024 tokens: engine-precomputed >= 40% MFU; measured "
              f"{'-' if mfu is None else f'{mfu:.1%}'} on {info['device']}")
    device_name = "cpu" if cpu else torch.cuda.get_device_name(args.device)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu-{datetime.date.today()}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": info, "summary": rows, "runs": [asdict(m) for m in measurements]}
    out.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwrote {out}")


def main(argv: list[str] | None = None) -> None:
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
              "Peak memory is the process's peak RSS.")
    with tempfile.TemporaryDirectory() as scratch:
        inputs = build_inputs(args, Path(scratch) / "model", config)
        info = machine_info(inputs, args) | {
            "model": f"random-init Llama, {args.model_size}: {shape}", "attention": args.attn, "compile": args.compile,
            "peak_tflops": peak, "peak_source": peak_source, "flops": asdict(flops),
        }
        print(json.dumps({k: v for k, v in info.items() if k != "settings"}, default=str))
        measurements, peak_memory = measure(inputs, args)
    rows = summarize(measurements)
    add_efficiency(rows, flops, peak, peak_memory)
    write_report(rows, measurements, info, args, flops)


if __name__ == "__main__":
    main()
