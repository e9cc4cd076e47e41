"""Build a model and pair file unlike the embedded default, to check bench/throughput.py's ratios elsewhere.

    python bench/other_model_data.py /tmp/other && python bench/throughput.py --model /tmp/other/gpt2-wide \
        --data /tmp/other/pairs.jsonl --repeats 3

A GPT-2-shaped model (learned positions, n_embd 192, 4 layers, 1.8M parameters, random init) with the
word-level tokenizer and chat template of tests/tiny_world.py, and 2,000 conversational pairs rendered through
that template (the quickstart uses a Llama-shaped model and explicit prompt/chosen/rejected strings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from tests.tiny_world import build_tokenizer, pair_rows, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpt2-wide/ and pairs.jsonl")
    parser.add_argument("--pairs", type=int, default=2000, help="number of pairs (default 2000)")
    args = parser.parse_args()
    model_dir = args.out / "gpt2-wide"
    tokenizer = build_tokenizer(model_dir, with_pad=True)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=192, n_layer=4, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    write_jsonl(args.out / "pairs.jsonl", pair_rows("conversational", args.pairs, seed=3))
    print(f"model: {model_dir}\npairs: {args.out / 'pairs.jsonl'}")


if __name__ == "__main__":
    main()
