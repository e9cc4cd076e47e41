"""`dpo plan`'s figures against the measured peak memory of real training steps on CPU.

    python bench/plan_vs_measured.py                 # three shapes, fp32, with and without checkpointing
    python bench/plan_vs_measured.py --bf16          # also bf16 autocast (about 80 s of CPU time in all)
    python bench/plan_vs_measured.py --json out.json

For each of three small random models built from configs (Llama-, GPT-2- and Qwen2-shaped; the Qwen2 one
has Qwen2's 151,936-token vocabulary), one DPO-like optimizer step runs on CPU: 2 micro-batches of 2 pairs
(4 rows: chosen and rejected) x 128 tokens, half the rows padded at the end, a sigmoid DPO loss against
fixed reference log-probs, backward, gradient clipping and a fused AdamW step. The log-prob head is a
chunked one (torch.utils.checkpoint around each chunk of HEAD_CHUNK_TOKENS tokens through the output layer:
the final hidden states and one float32 per token are kept, a chunk's logits are recomputed in backward),
which is what the plan assumes. The step measured is the second one, so that AdamW's state exists, as in
every step but the first.

The peak is measured, not counted: torch's profiler records every CPU allocation and free of the step
(profile_memory: each allocation event carries the allocator's running total since profiling began), and
the peak of the bytes alive is the bytes alive when it starts (weights, optimizer state, the batch,
counted exactly) plus the highest running total. The planned figure is trainables/memory_plan.plan_memory for the
same shape and setup (one device, fp32 on CPU, or bf16 autocast with --bf16). The precomputing reference
pass (forward only, no_grad, 8 pairs) is measured the same way against `reference_pass_bytes`.
tests/test_plan.py runs the same measurements (with a smaller vocabulary) and requires the plan within 25%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from trainables.memory_plan import (  # noqa: E402
    MemoryPlan, TrainingSetup, model_shape_from_config, plan_memory, reference_pass_bytes,
)

MIB = 1 << 20


def shape_configs(vocab_size: int | None = None) -> dict:
    """Three small causal-LM configs: Llama-, GPT-2- and Qwen2-shaped, with their families' vocabularies
    (32,000, 50,257 and Qwen2's 151,936, tied) unless `vocab_size` replaces them (tests: a faster head)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    vocab = lambda default: vocab_size or default  # noqa: E731
    return {
        "llama": LlamaConfig(vocab_size=vocab(32000), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512),
        "gpt2": GPT2Config(vocab_size=vocab(50257), n_embd=256, n_layer=4, n_head=8, n_positions=512,
                           bos_token_id=vocab(50257) - 1, eos_token_id=vocab(50257) - 1),
        "qwen2": Qwen2Config(vocab_size=vocab(151936), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True),
    }


@dataclass(frozen=True)
class StepSettings:
    micro_batch_pairs: int = 2
    micro_batches: int = 2  # gradient accumulation: the plan's "everything alive at once" case
    seq_len: int = 128
    checkpointing: bool = False
    bf16: bool = False  # bf16 autocast (fp32 weights), as the engine computes on a GPU
    head_chunk_tokens: int = 256  # two chunks per micro-batch (the plan takes the same figure)

    def setup(self) -> TrainingSetup:
        return TrainingSetup(strategy="single", num_workers=1, micro_batch_pairs=self.micro_batch_pairs,
                             seq_len=self.seq_len, compute="bf16" if self.bf16 else "fp32",
                             gradient_checkpointing=self.checkpointing, head_chunk_tokens=self.head_chunk_tokens)


@dataclass(frozen=True)
class Measurement:
    shape: str
    settings: StepSettings
    peak_bytes: int  # measured
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int  # AdamW's two moments (its step counters, 4 bytes per tensor, are left out)
    planned_bytes: int
    plan: MemoryPlan

    @property
    def ratio(self) -> float:
        return self.planned_bytes / self.peak_bytes


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def highest_allocated(prof) -> int:
    """The most bytes the CPU allocator held at once during the profile, above what it held at its start.

    Every allocation event carries the allocator's running total (c10's ProfiledCPUMemoryReporter, which
    counts while memory profiling is on and may carry blocks over from an earlier profile): the peak is
    its highest value less its value just before the first event.
    """
    from torch._C._profiler import _EventType

    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append(event)
    if not events:
        return 0
    first = min(events, key=lambda event: event.start_time_ns).typed[1]
    return max(event.typed[1].total_allocated for event in events) - (first.total_allocated - first.alloc_size)


def chunked_sequence_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Summed answer-token log-probs per row; (tokens x vocab) logits exist one chunk at a time."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # (rows, seq, hidden)
    rows, seq_len, width = hidden.shape
    output_layer = model.get_output_embeddings()
    targets = F.pad(batch["input_ids"][:, 1:], (0, 1)).reshape(-1)  # position t predicts token t + 1
    flat = hidden.reshape(-1, width)  # a view: no copy

    def chunk_logps(states: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = output_layer(states)  # (chunk, vocab)
        picked = logits.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1).float()
        return picked - torch.logsumexp(logits.float(), dim=-1)

    logps = torch.cat([checkpoint(chunk_logps, flat[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                                  use_reentrant=False)
                       for start in range(0, flat.shape[0], chunk_tokens)]).view(rows, seq_len)
    predicts_answer = F.pad(batch["answer_mask"][:, 1:], (0, 1))  # (rows, seq)
    return (logps * predicts_answer).sum(-1)


def make_batch(vocab: int, settings: StepSettings, seed: int) -> dict[str, torch.Tensor]:
    """2 x micro_batch_pairs rows (chosen, then rejected) of seq_len tokens; every other row ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    rows, seq = 2 * settings.micro_batch_pairs, settings.seq_len
    input_ids = torch.randint(0, vocab, (rows, seq), generator=generator)
    attention_mask = torch.ones(rows, seq, dtype=torch.long)
    attention_mask[1::2, -seq // 8:] = 0
    answer_mask = torch.zeros(rows, seq, dtype=torch.bool)
    answer_mask[:, seq // 4:] = True
    answer_mask &= attention_mask.bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}


def _dpo_step(model, optimizer, batches, settings: StepSettings, beta: float = 0.1) -> None:
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            logps = chunked_sequence_logps(model, batch, settings.head_chunk_tokens)
        chosen, rejected = logps.float().chunk(2)
        margin = (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])
        loss = -F.logsigmoid(beta * margin).mean() / len(batches)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def build_model(config, checkpointing: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():  # dropout off, as the engine's disable_dropout does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def measure(name: str, config, settings: StepSettings) -> Measurement:
    """The measured peak of the second optimizer step, and the plan for the same shape and setup."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(config, settings.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7, fused=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    batches = []
    for index in range(settings.micro_batches):
        batch = make_batch(vocab, settings, seed=index)
        pairs = settings.micro_batch_pairs
        batch.update(ref_chosen=torch.full((pairs,), -50.0), ref_rejected=torch.full((pairs,), -50.0))
        batches.append(batch)
    for parameter in model.parameters():  # AdamW's state appears at its first step, as in every later one
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights = _bytes(model.parameters())
    states = _bytes(value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))
    moments = _bytes(state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))
    inputs = _bytes(value for batch in batches for value in batch.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _dpo_step(model, optimizer, batches, settings)
    gradients = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    highest = highest_allocated(prof)
    plan = plan_memory(model_shape_from_config(config), settings.setup())
    return Measurement(shape=name, settings=settings, peak_bytes=weights + states + inputs + highest,
                       weights_bytes=weights, gradient_bytes=gradients, optimizer_bytes=moments,
                       planned_bytes=plan.total, plan=plan)


def measure_reference_pass(name: str, config, settings: StepSettings, pairs: int = 8) -> tuple[int, int]:
    """(measured, planned) peak bytes of the precomputing pass: the reference forward-only under no_grad on
    `pairs` pairs, the chunked head computing the log-probs."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(config, checkpointing=False).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = make_batch(vocab, replace(settings, micro_batch_pairs=pairs), seed=0)
    resident = _bytes(model.parameters()) + _bytes(batch.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            chunked_sequence_logps(model, batch, settings.head_chunk_tokens)
    planned = reference_pass_bytes(model_shape_from_config(config),
                                   replace(settings.setup(), reference_batch_pairs=pairs))
    return resident + highest_allocated(prof), planned


def run(bf16: bool = False, shapes: list[str] | None = None) -> list[Measurement]:
    torch.set_num_threads(min(4, torch.get_num_threads()))
    configs = shape_configs()
    results = []
    for name in shapes or list(configs):
        for checkpointing in (False, True):
            for use_bf16 in ((False, True) if bf16 else (False,)):
                results.append(measure(name, configs[name], StepSettings(checkpointing=checkpointing, bf16=use_bf16)))
    return results


def print_table(results: list[Measurement]) -> None:
    print(f"{'shape':<7} {'params':>7} {'precision':<9} {'ckpt':<5} {'measured MiB':>12} {'planned MiB':>11} "
          f"{'plan/measured':>13}   {'plan: weights+grads+optim / activations / head (MiB)'}")
    for r in results:
        parts = r.plan.parts
        static = parts["weights"] + parts["master_copy"] + parts["gradients"] + parts["optimizer"]
        print(f"{r.shape:<7} {r.plan.shape.parameters / 1e6:>6.1f}M {'bf16' if r.settings.bf16 else 'fp32':<9} "
              f"{'yes' if r.settings.checkpointing else 'no':<5} {r.peak_bytes / MIB:>12.1f} {r.planned_bytes / MIB:>11.1f} "
              f"{r.ratio:>13.3f}   {static / MIB:.1f} / {parts['activations'] / MIB:.1f} / {parts['logprob_head'] / MIB:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true", help="also measure under bf16 autocast")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of llama,gpt2,qwen2")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    started = time.time()
    results = run(bf16=args.bf16, shapes=args.shapes.split(",") if args.shapes else None)
    print(f"{len(results)} steps measured in {time.time() - started:.1f} s on {torch.get_num_threads()} threads "
          f"(torch {torch.__version__}); micro-batch {results[0].settings.micro_batch_pairs} pairs x "
          f"{results[0].settings.seq_len} tokens, {results[0].settings.micro_batches} micro-batches")
    print_table(results)
    if args.json:
        rows = [{"shape": r.shape, "parameters": r.plan.shape.parameters, "bf16": r.settings.bf16,
                 "checkpointing": r.settings.checkpointing, "measured_bytes": r.peak_bytes,
                 "planned_bytes": r.planned_bytes, "ratio": round(r.ratio, 4), "plan_parts": r.plan.parts}
                for r in results]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    worst = max(abs(math.log(r.ratio)) for r in results)
    print(f"worst plan/measured: {math.exp(worst):.3f}x off")
    print("\nreference pass (forward-only under no_grad, 8 pairs = 16 rows x 128 tokens):")
    for name, config in shape_configs().items():
        if args.shapes and name not in args.shapes.split(","):
            continue
        for use_bf16 in ((False, True) if args.bf16 else (False,)):
            measured, planned = measure_reference_pass(name, config, StepSettings(bf16=use_bf16))
            print(f"{name:<7} {'bf16' if use_bf16 else 'fp32':<5} measured {measured / MIB:>7.1f} MiB  "
                  f"planned {planned / MIB:>7.1f} MiB  plan/measured {planned / measured:.3f}")

if __name__ == "__main__":
    main()
