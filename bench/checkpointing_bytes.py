"""Bytes kept for backward with and without train.gradient_checkpointing, and that nothing else changes.

    python bench/checkpointing_bytes.py                       # Qwen2-shaped, hidden 256, 4 layers, 4 rows x 512
    python bench/checkpointing_bytes.py --hidden-size 512 --layers 8 --rows 2 --seq-len 1024

One forward and backward of a random-init Qwen2-shaped causal LM (fp32, on the CPU, a next-token loss
over every position), loaded and switched exactly as the engine does it (trainables/modeling.py:
load_causal_lm, enable_gradient_checkpointing). The bytes kept for backward are counted with
torch.autograd.graph.saved_tensors_hooks, each storage once; under non-reentrant checkpointing the
checkpoint holds each decoder layer's input itself (the hook does not see those), so they are added:
layers x rows x seq x hidden x 4 bytes. Also prints the largest difference in loss and gradients
between the two (fp32: equal within 1e-5 is what tests/test_precision.py requires). Never a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainables.modeling import enable_gradient_checkpointing, load_causal_lm  # noqa: E402

MIB = 1 << 20


def saved_bytes_loss_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, float, dict[str, torch.Tensor]]:
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(kept.values()), loss.item(), {name: p.grad for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=True)
    ids = torch.randint(0, args.vocab_size, (args.rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(scratch)
        plain_bytes, plain_loss, plain_grads = saved_bytes_loss_grads(load_causal_lm(scratch), ids)
        model = load_causal_lm(scratch)
        enable_gradient_checkpointing(model)
        hooked_bytes, loss, grads = saved_bytes_loss_grads(model, ids)
    layer_inputs = args.layers * args.rows * args.seq_len * args.hidden_size * 4
    checkpointed = hooked_bytes + layer_inputs
    worst = max(float((grads[name] - grad).abs().max()) for name, grad in plain_grads.items())
    print(f"Qwen2-shaped: hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab_size}; "
          f"{args.rows} rows x {args.seq_len} tokens, fp32")
    print(f"kept for backward without checkpointing: {plain_bytes / MIB:8.1f} MiB")
    print(f"kept for backward with checkpointing:    {checkpointed / MIB:8.1f} MiB "
          f"({hooked_bytes / MIB:.1f} seen by the hook + {layer_inputs / MIB:.1f} layer inputs held by the checkpoint)"
          f" = {checkpointed / plain_bytes:.2f} of it")
    print(f"loss difference {abs(loss - plain_loss):.2e}; largest gradient difference {worst:.2e}")


if __name__ == "__main__":
    main()
