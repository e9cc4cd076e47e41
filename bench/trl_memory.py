"""Peak memory (RSS) of a short DPO training run: this engine vs TRL's DPOTrainer, same model, data and batch.

    python bench/trl_memory.py                      # Qwen2-shaped, vocab 151,936, 2 layers, hidden 64; batch 8 x 256
    python bench/trl_memory.py --hidden-size 128 --layers 4 --seq-len 512 --methods engine-precomputed,trl-live

The model is a random-init Qwen2 built from a config (no hub): Qwen2-0.5B's vocabulary (151,936) and tied
embeddings, at a small depth and width so a step runs on a CPU in seconds; the output layer is what a real
vocabulary makes expensive. The pairs are random token ids written as words of a WordLevel tokenizer
(bench/gpu.py's), a prompt of seq_len // 4 tokens and two answers filling each row to seq_len tokens.
Each method runs in a fresh Python process (so one method's allocations never count for another) and
reports its process's peak RSS (ru_maxrss) and, for comparison, its RSS once the model, tokenizer and
pairs are loaded and before anything trains:
- engine-precomputed: `dpo train`'s engine (trainables' DPOObjective + run_training_loop, via
  bench/throughput.py) with the reference log-probs precomputed in the same process first, as `dpo train`
  does with reference.mode precomputed; 2 optimizer steps (the last one with its checkpoint);
- dpo-train: the `dpo train` command itself (orchestrator.cli.main in a fresh process) on the same pairs written
  as JSONL files, reference.mode precomputed, 2 optimizer steps, a checkpoint at the end, no evaluation set;
- trl-live: trl.DPOTrainer with its defaults (a live reference model, gradient checkpointing on), 1 step;
- trl-precomputed: the same with precompute_ref_log_probs=True.
Every method: fp32 on the CPU, batch --batch-size pairs in one micro-batch, max_length --seq-len, lr 1e-5,
beta 0.1, sigmoid loss. Prints one line per method and the ratio engine / TRL. Never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("dpo-train", "engine-precomputed", "trl-live", "trl-precomputed")
GIB = 1 << 30


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; else the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def qwen2_config(args: argparse.Namespace):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=True,
                       pad_token_id=0, eos_token_id=1, bos_token_id=None, use_cache=False)


def dpo_train(args: argparse.Namespace) -> None:
    """`dpo train` in this process on the synthetic pairs as JSONL files; prints one JSON line."""
    from gpu import synthetic_pairs
    from orchestrator.cli.main import main as dpo

    scratch = Path(tempfile.mkdtemp(prefix="dpo-train-memory-"))
    rows = [{"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            for pair in synthetic_pairs(args.batch_size * 2, args.seq_len, args.vocab_size)]
    (scratch / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {"name": "memory", "output_dir": str(scratch / "out"), "model": {"path": args.model_dir},
              "data": {"train": str(scratch / "pairs.jsonl"), "max_length": args.seq_len},
              "dpo": {"beta": 0.1, "loss": "sigmoid"}, "reference": {"mode": "precomputed", "cache_dir": str(scratch / "cache")},
              "train": {"learning_rate": 1e-5, "batch_size": args.batch_size, "max_steps": 2, "warmup_steps": 0,
                        "log_every": 1, "checkpoint_every": 2, "eval_every": 1000}}
    (scratch / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    code = dpo(["train", str(scratch / "config.yaml")])
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": "dpo-train", "exit": code, "peak_rss_bytes": peak, "loaded_rss_bytes": 0,
                      "seconds": seconds}))


def child(args: argparse.Namespace) -> None:
    """One method in this process; prints one JSON line."""
    if args.child == "dpo-train":
        return dpo_train(args)
    import torch

    import throughput
    from gpu import synthetic_pairs
    from trainables.entrypoints import tokenizer_for
    from trainables.tokenization import tokenize_pairs

    torch.set_num_threads(args.threads)
    tokenizer = tokenizer_for(throughput.engine_run(args.model_dir).model)
    pairs = synthetic_pairs(args.batch_size * 2, args.seq_len, args.vocab_size)
    inputs = throughput.Inputs(model_dir=args.model_dir, tokenizer=tokenizer, pairs=pairs,
                               tokenized=tokenize_pairs(pairs, tokenizer, args.seq_len), device=torch.device("cpu"),
                               autocast_dtype=None)
    run_args = argparse.Namespace(beta=0.1, learning_rate=1e-5, batch_size=args.batch_size, warmup=0, steps=1,
                                  padding_buckets="auto", threads=args.threads, max_length=args.seq_len,
                                  trl_gradient_checkpointing=True)  # TRL's default
    loaded = rss_bytes()
    started = time.perf_counter()
    throughput.run_method(args.child, inputs, run_args, repeat=0)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"method": args.child, "peak_rss_bytes": peak, "loaded_rss_bytes": loaded, "seconds": seconds}))


def write_model(args: argparse.Namespace, directory: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from gpu import write_model_and_tokenizer

    config = qwen2_config(args)
    write_model_and_tokenizer(directory, config, torch.device("cpu"))
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256, help="max_length: tokens per row (prompt + answer)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step, one micro-batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per method")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        parameters = write_model(args, Path(scratch) / "model")
        print(f"Qwen2-shaped model: {parameters / 1e6:.1f}M parameters, vocab {args.vocab_size}, hidden "
              f"{args.hidden_size}, {args.layers} layers; batch {args.batch_size} pairs x {args.seq_len} tokens; fp32 "
              f"on CPU, {args.threads} thread(s); one process per method", flush=True)
        for method in args.methods.split(","):
            command = [sys.executable, __file__, "--child", method, "--model-dir", str(Path(scratch) / "model"),
                       *[f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                         ("vocab_size", "hidden_size", "layers", "seq_len", "batch_size", "threads")]]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                print(f"{method}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
                continue
            results[method] = json.loads(lines[-1])
            row = results[method]
            loaded = (f"after loading: {row['loaded_rss_bytes'] / GIB:.2f} GiB" if row["loaded_rss_bytes"]
                      else "the whole command, imports and data checks included")
            print(f"{method:<20} peak RSS {row['peak_rss_bytes'] / GIB:6.2f} GiB   ({loaded}; {row['seconds']:.1f} s)",
                  flush=True)
    for ours in ("dpo-train", "engine-precomputed"):
        for peer in ("trl-live", "trl-precomputed"):
            if ours in results and peer in results:
                ratio = results[ours]["peak_rss_bytes"] / results[peer]["peak_rss_bytes"]
                print(f"{ours} / {peer}: {ratio:.2f} of the peak RSS ({'at most' if ratio <= 0.5 else 'more than'} half)")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")


if __name__ == "__main__":
    main()
