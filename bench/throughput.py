"""Training throughput: this project's DPO step vs TRL's DPOTrainer vs a compute-bound reference.

    python bench/throughput.py --steps 40 --warmup 5 --repeats 3       # the defaults: ~2.5 min on 2 CPU cores
    python bench/throughput.py --model /models/my-llama --data pairs.jsonl --batch-size 8 --max-length 512

Every method gets the same model, pairs, batch size, max_length, lr, beta (sigmoid loss), clipping 1.0,
weight decay 0 and precision (fp32 on CPU, bf16 autocast on CUDA):
- engine-*: trainables' DPOObjective + run_training_loop (`dpo train`), forwards by length (--padding-buckets;
  -unbucketed: 1), the shared-prompt forward (train.share_prompt auto: one row per pair, each prompt computed
  once; -unshared: false, the standard 2B rows, the A/B), reference log-probs precomputed (timed apart, never
  in step throughput) or from a live model (which shares the prompt too);
- trl-live / trl-precomputed: trl.DPOTrainer (precompute_ref_log_probs False / True), no eval, no saving,
  report_to none, 0 dataloader workers, TRL's defaults otherwise (fused AdamW, fused LM head), except its
  default gradient checkpointing, off so that every method does the same compute (--trl-gradient-checkpointing);
- bound-*: plain next-token forward + backward + AdamW (fused, no clipping) over the pairs' real tokens
  (prompt+chosen, prompt+rejected: the prompt counted twice), no padding, batches built before timing, so a
  shared-prompt forward, which computes each prompt once, can beat it; the fastest layout is the bound:
  `dense` (the token stream re-cut into 2B equal rows, GPT-style packing: same weight FLOPs, one forward), `buckets`
  (the exact sequences grouped by length, one forward per length), `packed` (one row, block-diagonal attention).
Throughput = steady-state wall time between step boundaries over --steps optimizer steps after --warmup
(collation, logging included; setup and precompute not), methods round-robin, --repeats times, medians shown;
tokens/s counts real (non-pad) tokens of the pairs' sequences, prompt twice, for every method (so the same
work counts the same; a shared-prompt engine computes fewer). Writes the figures as JSON to --out. Never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute progress bar reads this at call time
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from orchestrator.config.spec import RunSpec  # noqa: E402
from tests.tiny_world import engine_args  # noqa: E402
from trainables.data import PreferencePair, load_preference_pairs  # noqa: E402
from trainables.dpo_objective import CachedReference, DPOObjective, LiveReference  # noqa: E402
from trainables.entrypoints import PreferenceData, precompute_reference, tokenizer_for  # noqa: E402
from trainables.loop import global_batch_indices, run_training_loop  # noqa: E402
from trainables.preference_loss import build_preference_loss  # noqa: E402
from trainables.modeling import load_causal_lm, parameter_count, resolve_device  # noqa: E402
from trainables.tokenization import TokenizedPair, pair_token_count, tokenize_pairs  # noqa: E402

METHODS = ("engine-precomputed", "engine-precomputed-unbucketed", "engine-precomputed-unshared", "engine-live",
           "trl-live", "trl-precomputed", "bound-dense", "bound-buckets", "bound-packed")


@dataclass
class Inputs:  # what every method shares
    model_dir: str
    tokenizer: Any
    pairs: list[PreferencePair]
    tokenized: list[TokenizedPair]
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = full fp32

    def load_model(self, policy: bool = True) -> torch.nn.Module:  # policy=False: a live reference; see bench/gpu.py
        return load_causal_lm(self.model_dir)  # a fresh fp32 copy, sdpa, dropout off


@dataclass
class Measurement:
    method: str
    repeat: int
    seconds: float  # wall time of the timed steps
    steps: int
    pairs: int
    tokens: int  # real tokens through the policy in the timed steps
    precompute_seconds: float | None = None
    torch_threads: int = 0
    pairs_per_second: float = field(init=False)
    tokens_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.pairs_per_second, self.tokens_per_second = self.pairs / self.seconds, self.tokens / self.seconds


class StepClock:
    """Timestamps at step boundaries and the real-token count of each step."""

    def __init__(self, device: torch.device):
        self.device, self.marks, self.tokens = device, [], []

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def measure(self, method: str, repeat: int, warmup: int, steps: int, batch_size: int, **extra) -> Measurement:
        """Steps [warmup, warmup + steps) lie between marks[warmup] and marks[warmup + steps]."""
        if len(self.marks) <= warmup + steps or len(self.tokens) < warmup + steps:
            raise RuntimeError(f"{method}: only {len(self.marks)} step marks recorded, expected {warmup + steps + 1}")
        return Measurement(method=method, repeat=repeat, seconds=self.marks[warmup + steps] - self.marks[warmup],
                           steps=steps, pairs=steps * batch_size, tokens=sum(self.tokens[warmup : warmup + steps]),
                           torch_threads=torch.get_num_threads(), **extra)


class TimedDPOObjective(DPOObjective):
    """The engine's objective, stamping the clock when the loop asks for a step's token count (once per step, first)."""

    def __init__(self, clock: StepClock, **kwargs):
        super().__init__(**kwargs)
        self.clock = clock

    def token_count(self, indices) -> int:
        self.clock.mark()
        self.clock.tokens.append(sum(pair_token_count(self.train_pairs[i]) for i in indices))
        return super().token_count(indices)


def engine_run(model_dir: str, data: str = "in-memory pairs", **settings: Any) -> RunSpec:
    """The engine's argument groups as `dpo train` resolves them from a config with `settings` (config keys, "__"
    for the dot; every other key takes the config's default). data: data.train, never read here: the pairs are
    loaded and tokenised before any timing."""
    return engine_args(model_dir, data, **settings)


def run_engine(inputs: Inputs, args: argparse.Namespace, repeat: int, variant: str) -> Measurement:
    """The engine as `dpo train` runs it, minus eval and checkpoints inside the timed window."""
    reference_mode, _, modifier = variant.partition("-")  # e.g. "precomputed-unbucketed", "precomputed-unshared"
    clock, padding_buckets = StepClock(inputs.device), 1 if modifier == "unbucketed" else args.padding_buckets
    share_prompt = False if modifier == "unshared" else "auto"
    precision = "bf16" if inputs.autocast_dtype is not None else "fp32"
    with tempfile.TemporaryDirectory() as scratch:
        spec = engine_run(  # the extra last step (final eval + checkpoint) is not timed
            inputs.model_dir, reference_cache=scratch, output_dir=scratch, dpo__beta=args.beta, dpo__loss="sigmoid",
            reference__batch_size=args.batch_size, train__device=str(inputs.device), train__precision=precision,
            train__learning_rate=args.learning_rate, train__batch_size=args.batch_size,
            train__micro_batch_size=args.batch_size, train__max_steps=args.warmup + args.steps + 1,
            train__warmup_steps=0, train__schedule="linear", train__weight_decay=0.0, train__max_grad_norm=1.0,
            train__eval_every=args.warmup + args.steps + 1, train__checkpoint_every=args.warmup + args.steps + 1,
            train__keep_checkpoints=1, train__log_every=10,
            train__seed=repeat)
        precompute_seconds = None
        if reference_mode == "precomputed":
            started = time.perf_counter()  # a fresh cache folder: the pass really runs
            train_values, _, _, _ = precompute_reference(
                spec.model, spec.preference, PreferenceData(tokenizer=inputs.tokenizer, train=inputs.tokenized, eval=[]),
                spec.runtime,
            )
            precompute_seconds = time.perf_counter() - started
            reference = CachedReference(train_values, None)
        else:
            reference = LiveReference(inputs.load_model(policy=False).to(inputs.device), False, inputs.autocast_dtype,
                                      padding_buckets=padding_buckets, share_prompt=share_prompt,
                                      pad_token_id=inputs.tokenizer.pad_token_id)
        torch.manual_seed(repeat)
        model = inputs.load_model().to(inputs.device)
        objective = TimedDPOObjective(
            clock, train_pairs=inputs.tokenized, eval_pairs=[], reference=reference,
            loss=build_preference_loss(spec.preference.loss), beta=args.beta,
            kl_weight=0.0, exact_kl=False, pad_token_id=inputs.tokenizer.pad_token_id, device=inputs.device,
            autocast_dtype=inputs.autocast_dtype, eval_batch_size=args.batch_size, padding_buckets=padding_buckets,
            share_prompt=share_prompt,
        )
        run_training_loop(model=model, tokenizer=inputs.tokenizer, objective=objective, settings=spec.loop,
                          report=lambda metrics, checkpoint: None, device=inputs.device)
    return clock.measure(f"engine-{variant}", repeat, args.warmup, args.steps, args.batch_size,
                         precompute_seconds=precompute_seconds)


def run_trl(inputs: Inputs, args: argparse.Namespace, repeat: int, reference_mode: str) -> Measurement:
    """trl.DPOTrainer on the same text pairs; a callback stamps the clock at every step end."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock, precompute = StepClock(inputs.device), reference_mode == "precomputed"

    class StepEndClock(TrainerCallback):  # marks[k] = end of step k, marks[0] = before step 1
        on_train_begin = on_step_end = lambda self, *unused, **kwargs: clock.mark()

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            started = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            elapsed = time.perf_counter() - started
            self.bench_precompute_seconds = getattr(self, "bench_precompute_seconds", 0.0) + elapsed
            return result

        def training_step(self, model, inputs, *rest, **kwargs):
            clock.tokens.append(int(inputs["attention_mask"].sum()))  # real tokens: pads have mask 0
            return super().training_step(model, inputs, *rest, **kwargs)

    dataset = Dataset.from_list([asdict(p) for p in inputs.pairs])  # prompt, chosen, rejected
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=scratch, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            learning_rate=args.learning_rate, max_steps=args.warmup + args.steps, beta=args.beta,
            loss_type=["sigmoid"], max_length=args.max_length, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=args.batch_size, bf16=inputs.autocast_dtype is not None, fp16=False,
            use_cpu=inputs.device.type == "cpu", gradient_checkpointing=args.trl_gradient_checkpointing,
            weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="linear", logging_steps=10,
            report_to="none", save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
            disable_tqdm=True, seed=repeat,
        )
        model = inputs.load_model()  # fp32, sdpa, dropout off; TRL builds the live reference from its path
        trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=inputs.tokenizer,
                                  callbacks=[StepEndClock()])
        trainer.remove_callback(PrinterCallback)  # no log dicts printed every 10 steps
        torch.set_num_threads(args.threads)
        trainer.train()
    return clock.measure(f"trl-{reference_mode}", repeat, args.warmup, args.steps, args.batch_size,
                         precompute_seconds=getattr(trainer, "bench_precompute_seconds", None))


def bound_chunks(pairs: list[TokenizedPair], layout: str, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids, position_ids, labels) batches holding the pairs' real tokens, without padding.

    dense: the token stream of all sequences re-cut into 2B equal rows (GPT-style packing, attention may
    cross sequence ends; same weight FLOPs, attention FLOPs no more than the real sequences'), the last
    row topped up from the stream's start (< 2B extra tokens, not counted: that only lowers the bound);
    buckets: the sequences themselves, grouped by length into dense batches (one forward per length);
    packed: all sequences in one row, positions restarting per sequence (block-diagonal attention).
    """
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    if layout == "dense":
        stream = torch.tensor([token for sequence in sequences for token in sequence])  # (tokens,)
        rows = len(sequences)
        length = -(-stream.numel() // rows)  # ceil: rows * length >= tokens
        ids = torch.cat([stream, stream[: rows * length - stream.numel()]]).view(rows, length)  # (2B, length)
        labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)  # (2B, length)
        return [(ids.to(device), torch.arange(length).expand(rows, -1).to(device), labels.to(device))]
    if layout == "packed":
        ids = torch.tensor([token for sequence in sequences for token in sequence])  # (tokens,)
        positions = torch.cat([torch.arange(len(sequence)) for sequence in sequences])  # (tokens,)
        labels = torch.cat([torch.tensor(sequence[1:] + (-100,)) for sequence in sequences])  # (tokens,), per sequence
        return [tuple(t.unsqueeze(0).to(device) for t in (ids, positions, labels))]  # each (1, tokens)
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for sequence in sequences:
        by_length.setdefault(len(sequence), []).append(sequence)
    chunks = []
    for length, group in sorted(by_length.items()):
        ids = torch.tensor(group)  # (rows, length), every row the same length: no padding
        labels = torch.cat([ids[:, 1:], torch.full((len(group), 1), -100)], dim=1)  # (rows, length)
        chunks.append((ids.to(device), torch.arange(length).expand(len(group), -1).to(device), labels.to(device)))
    return chunks


def run_bound(inputs: Inputs, args: argparse.Namespace, repeat: int, layout: str) -> Measurement:
    """Plain next-token cross-entropy forward + backward + AdamW over the real tokens, batches built beforehand."""
    clock = StepClock(inputs.device)
    torch.manual_seed(repeat)
    model = inputs.load_model().to(inputs.device).train()
    try:  # fused AdamW: CUDA, and CPU from torch 2.4
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    batches = [[inputs.tokenized[i] for i in global_batch_indices(step, len(inputs.tokenized), args.batch_size, repeat)]
               for step in range(args.warmup + args.steps + 1)]
    plan = [(bound_chunks(batch, layout, inputs.device), sum(map(pair_token_count, batch))) for batch in batches]
    for chunks, tokens in plan:
        clock.mark()
        clock.tokens.append(tokens)
        optimizer.zero_grad(set_to_none=True)
        for input_ids, position_ids, labels in chunks:
            with torch.autocast(inputs.device.type, dtype=inputs.autocast_dtype or torch.float32,
                                enabled=inputs.autocast_dtype is not None):
                logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            # logits: (rows, seq, vocab); labels: (rows, seq), -100 where no next token of the same sequence
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
            (loss / tokens).backward()
        optimizer.step()
    return clock.measure(f"bound-{layout}", repeat, args.warmup, args.steps, args.batch_size)


def load_inputs(args: argparse.Namespace) -> Inputs:
    model_dir, data_path = args.model, args.data
    if model_dir is None or data_path is None:
        from orchestrator.workflows.demo_assets import build_demo_assets  # the embedded demo, built on first use
        demo = build_demo_assets()
        model_dir, data_path = model_dir or str(demo.model_dir), data_path or str(demo.data_files["preference_train"])
    tokenizer = tokenizer_for(engine_run(model_dir, data_path).model)
    pairs = load_preference_pairs(data_path, layout=args.layout, chat_template_tokenizer=tokenizer)[: args.max_pairs]
    if len(pairs) < args.batch_size:
        raise ValueError(f"{data_path} has {len(pairs)} valid pairs, fewer than --batch-size {args.batch_size}")
    device = resolve_device(args.device)
    bf16 = device.type == "cuda" and args.precision != "fp32" and torch.cuda.is_bf16_supported()
    return Inputs(model_dir=model_dir, tokenizer=tokenizer, pairs=pairs,
                  tokenized=tokenize_pairs(pairs, tokenizer, args.max_length), device=device,
                  autocast_dtype=torch.bfloat16 if bf16 else None)


def run_method(method: str, inputs: Inputs, args: argparse.Namespace, repeat: int) -> Measurement:
    family, variant = method.split("-", 1)
    runner: Callable[..., Measurement] = {"engine": run_engine, "bound": run_bound}.get(family, run_trl)
    return runner(inputs, args, repeat, variant)


def summarize(measurements: list[Measurement]) -> dict[str, dict[str, Any]]:
    """Medians per method, ratios to both TRL rows and the fraction of the faster bound layout."""
    rows: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(m.method for m in measurements):
        mine = [m for m in measurements if m.method == method]
        precompute = [m.precompute_seconds for m in mine if m.precompute_seconds is not None]
        rows[method] = {
            "pairs_per_second": statistics.median(m.pairs_per_second for m in mine),
            "pairs_per_second_min": min(m.pairs_per_second for m in mine),
            "pairs_per_second_max": max(m.pairs_per_second for m in mine),
            "tokens_per_second": statistics.median(m.tokens_per_second for m in mine),
            "real_tokens_per_pair": sum(m.tokens for m in mine) / sum(m.pairs for m in mine),
            "precompute_seconds": statistics.median(precompute) if precompute else None,
        }
    bounds = [name for name in rows if name.startswith("bound-")]
    best_bound = max(bounds, key=lambda name: rows[name]["pairs_per_second"]) if bounds else None
    for row in rows.values():
        for key, reference in (("vs_trl_live", "trl-live"), ("vs_trl_precomputed", "trl-precomputed"),
                               ("fraction_of_bound", best_bound)):
            base = rows.get(reference) if reference else None
            row[key] = row["pairs_per_second"] / base["pairs_per_second"] if base else None
    return rows


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    cell = lambda value, pattern: "-" if value is None else pattern.format(value)
    lines = [f"{'method':<30}{'pairs/s':>9}{'(min-max)':>16}{'tokens/s':>10}{'vs TRL-live':>13}"
             f"{'vs TRL-pre':>12}{'of bound':>10}{'precompute s':>14}"]
    for method, row in rows.items():
        spread = f"{row['pairs_per_second_min']:.1f}-{row['pairs_per_second_max']:.1f}"
        lines.append(
            f"{method:<30}{row['pairs_per_second']:>9.1f}{spread:>16}{row['tokens_per_second']:>10.0f}"
            f"{cell(row['vs_trl_live'], '{:.2f}x'):>13}{cell(row['vs_trl_precomputed'], '{:.2f}x'):>12}"
            f"{cell(row['fraction_of_bound'], '{:.0%}'):>10}{cell(row['precompute_seconds'], '{:.2f}'):>14}"
        )
    bound = next((m for m, row in rows.items() if row["fraction_of_bound"] == 1.0 and m.startswith("bound-")), None)
    return "\n".join(lines + [f"bound = {bound}, the fastest no-padding layout" if bound else "no bound run"])


def machine_info(inputs: Inputs, args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    import trl

    cuda = inputs.device.type == "cuda"
    device_name = torch.cuda.get_device_name(inputs.device) if cuda else platform.processor() or platform.machine()
    lengths = [pair_token_count(p) for p in inputs.tokenized]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "python": platform.python_version(), "device": f"{inputs.device} ({device_name})",
        "precision": "bf16 autocast" if inputs.autocast_dtype is not None else "fp32",
        "model": inputs.model_dir, "parameters": parameter_count(load_causal_lm(inputs.model_dir)),
        "pairs": len(inputs.tokenized), "mean_real_tokens_per_pair": sum(lengths) / len(lengths),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF causal LM directory (default: the embedded demo model)")
    parser.add_argument("--data", help="pair file, e.g. prompt/chosen/rejected jsonl (default: demo preference_train)")
    parser.add_argument("--layout", default="auto", help="auto | explicit | conversational | implicit_prompt")
    parser.add_argument("--max-pairs", type=int, default=4096, help="the first N valid pairs (bounds the precompute)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per optimizer step, every method")
    parser.add_argument("--max-length", type=int, default=64, help="max tokens of prompt + answer")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate, every method")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss)")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per method (round-robin); medians reported")
    parser.add_argument("--padding-buckets", type=lambda text: text if text == "auto" else int(text), default="auto",
                        help="engine-* (not -unbucketed): forwards per micro-batch by length, auto | K >= 1")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32"], help="auto: bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every method")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (off by default: same compute everywhere)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/throughput-<date>.json)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing rename notice
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    inputs = load_inputs(args)
    info = machine_info(inputs, args)
    print(json.dumps({k: v for k, v in info.items() if k != "settings"}, indent=None))
    measurements: list[Measurement] = []
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            torch.set_num_threads(args.threads)
            measurements.append(m := run_method(method, inputs, args, repeat))
            print(f"repeat {repeat} {method:<20} {m.pairs_per_second:8.1f} pairs/s ({m.seconds:.2f} s for {m.steps} "
                  f"steps, {m.torch_threads} threads)", flush=True)
    rows = summarize(measurements)
    print("\n" + format_table(rows))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).resolve().parent / "results" / f"throughput-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "summary": rows, "runs": [asdict(m) for m in measurements]},
                              indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
