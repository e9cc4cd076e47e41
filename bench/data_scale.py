"""Data at scale: pairs per second of validation + tokenisation + token-store write, and the driver's memory.

    python bench/data_scale.py                          # 1,000,000 synthetic pairs, num_proc 1 and 2
    python bench/data_scale.py --pairs 200000 --procs 1,2,4 --max-length 64

Writes `--pairs` synthetic preference pairs (trainables/synthetic_task.py problems: a chat-rendered prompt,
the correct answer as chosen, a corrupted one as rejected) to a JSON-lines file in a temporary folder, and
builds the demo model's tokenizer locally (orchestrator/workflows/demo_assets.build_tokenizer, no hub).
Then, for each num_proc, a fresh Python process (so that its peak memory is its own) runs what a sweep's
driver runs: read, validate and tokenise every row (trainables/tokenization.load_tokenized_pairs with
data.num_proc), then write the token store (trainables/token_store.write_token_store) and open it
memory-mapped. Each process reports its seconds per phase, pairs per second over the whole of it, its own
peak RSS (resource.getrusage RUSAGE_SELF: the driver) and its children's (RUSAGE_CHILDREN: the largest
forked worker), and checks that its pairs equal the num_proc=1 run's (a sha256 of every token id).
The first process also times the reference cache's key (reference_fingerprint) over the first
--fingerprint-pairs pairs, from the list and from the memory-mapped store: cache reuse needs the same key,
and the store must not make it much slower. The last line printed is one JSON object with every figure.
Never a test; figures and the machine they came from: docs/performance.md, "Data at scale".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 10  # ru_maxrss is in KiB on Linux


def write_pairs(path: Path, count: int, seed: int = 0) -> None:
    """`count` synthetic pairs as JSON lines (problems may repeat: the task has fewer distinct ones)."""
    from trainables import synthetic_task

    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            problem = synthetic_task.sample_problem(rng)
            row = {"prompt": synthetic_task.render_prompt(problem.prompt), "chosen": problem.answer,
                   "rejected": synthetic_task.corrupt_answer(problem, rng)}
            handle.write(json.dumps(row) + "\n")


def build_demo_tokenizer(directory: Path) -> None:
    from orchestrator.workflows.demo_assets import build_tokenizer
    from trainables import synthetic_task

    build_tokenizer(synthetic_task.build_splits(0)).save_pretrained(directory)


def pairs_digest(pairs) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(repr((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)).encode())
    return digest.hexdigest()[:16]


def run_one(args: argparse.Namespace) -> dict:
    """One num_proc: what the driver of a sweep does with the data, timed (runs in its own process)."""
    from transformers import AutoTokenizer

    from trainables.reference_cache import ReferenceKeyInputs, reference_fingerprint
    from trainables.token_store import open_token_store, write_token_store
    from trainables.tokenization import load_tokenized_pairs, prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    started = time.perf_counter()
    pairs = load_tokenized_pairs(args.data, tokenizer=tokenizer, max_length=args.max_length, num_proc=args.one)
    tokenised = time.perf_counter()
    store = write_token_store(Path(args.workdir) / f"tokens-np{args.one}", {"train": pairs, "eval": []},
                              f"np{args.one}")
    written = time.perf_counter()
    stored = open_token_store(store)["train"]
    opened = time.perf_counter()
    figures = {
        "num_proc": args.one, "pairs": len(pairs), "tokenise_s": round(tokenised - started, 2),
        "store_write_s": round(written - tokenised, 2), "store_open_s": round(opened - written, 3),
        "pairs_per_s": round(len(pairs) / (written - started)),
        "store_mib": round(sum(f.stat().st_size for f in store.iterdir()) / (1 << 20), 1),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB),
        "children_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / MIB),
        "tokens_sha": pairs_digest(pairs),
    }
    if args.fingerprint_pairs:
        inputs = ReferenceKeyInputs("weights", "LlamaForCausalLM", "float32", "float32", "sdpa")
        count = min(args.fingerprint_pairs, len(pairs))
        clock = time.perf_counter()
        from_list = reference_fingerprint(inputs, pairs[:count])
        list_s = time.perf_counter() - clock
        clock = time.perf_counter()
        from_store = reference_fingerprint(inputs, list(stored[i] for i in range(count)))  # random-access path
        store_s = time.perf_counter() - clock
        figures |= {"fingerprint_pairs": count, "fingerprint_list_s": round(list_s, 2),
                    "fingerprint_store_s": round(store_s, 2), "fingerprint_same_key": from_list == from_store}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--procs", default="1,2", help="comma-separated num_proc values, each run in a fresh process")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--fingerprint-pairs", type=int, default=100_000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one num_proc and print its JSON
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return
    load_before = os.getloadavg()[0]  # the machine may be shared: the figures depend on it
    with tempfile.TemporaryDirectory(prefix="dpo-data-scale-") as workdir:
        data, tokenizer = Path(workdir) / "pairs.jsonl", Path(workdir) / "tokenizer"
        clock = time.perf_counter()
        write_pairs(data, args.pairs)
        build_demo_tokenizer(tokenizer)
        print(f"wrote {args.pairs} pairs ({data.stat().st_size / (1 << 20):.0f} MiB) and the demo tokenizer in "
              f"{time.perf_counter() - clock:.0f} s", flush=True)
        runs = []
        for index, num_proc in enumerate(int(value) for value in args.procs.split(",")):
            command = [sys.executable, __file__, "--one", str(num_proc), "--data", str(data), "--tokenizer",
                       str(tokenizer), "--workdir", workdir, "--max-length", str(args.max_length),
                       "--fingerprint-pairs", str(args.fingerprint_pairs if index == 0 else 0)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    same = len({run["tokens_sha"] for run in runs}) == 1
    print(json.dumps({"bench": "data_scale", "pairs": args.pairs, "max_length": args.max_length,
                      "same_tokens_for_every_num_proc": same, "cpus": os.cpu_count(),
                      "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "runs": runs}))


if __name__ == "__main__":
    main()
