"""Sharded (FSDP) checkpoints vs gathering to rank 0: write time, file sizes per rank, rank 0's host memory.

Spawns W gloo ranks on CPU (torch.multiprocessing), loads a Llama of --layers x --hidden (default 4 x 1024:
207 MiB of float32 weights, 621 MiB with AdamW's two moments) sharded, runs one AdamW step, then writes
the checkpoint twice:
- sharded: trainables/checkpointing.py save_sharded_checkpoint (each rank writes and hashes its own shards);
- gathered: what FSDP checkpoints did before (sharding.gather_full_state to rank 0, save_checkpoint there).
Per way: wall seconds (rank 0, barrier to barrier), rank 0's RSS gain while writing (sampled every ms), and
the files each rank wrote. Then one process loads the sharded checkpoint (load_sharded_state, no process
group) and the load time is printed. Figures go to bench/results/sharded_checkpoint.json.

    python bench/sharded_checkpoint.py                 # 2 ranks (~1 min on 2 CPUs)
    python bench/sharded_checkpoint.py --world 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainables.host_memory import PeakRss  # noqa: E402 - the repository root is on the path now


def build_model(directory: Path, layers: int, hidden: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_world import build_tokenizer

    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, safe_serialization=True)


def worker(rank: int, world: int, init_file: str, model_dir: str, root: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from trainables.checkpointing import save_checkpoint
    from trainables.sharded_checkpoint import save_sharded_checkpoint
    from trainables.loop import build_optimizer
    from trainables.modeling import load_causal_lm
    from trainables.sharding import FSDPPreparer, empty_causal_lm, gather_full_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        model = FSDPPreparer(torch.device("cpu")).load_sharded(
            lambda meta: empty_causal_lm(model_dir) if meta else load_causal_lm(model_dir))
        optimizer = build_optimizer(model, 1e-3, 0.0)
        tokens = torch.randint(4, 16, (world, 16), generator=torch.Generator().manual_seed(0))[rank:rank + 1]
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        out, figures = Path(root), {}
        for way in ("sharded", "gathered"):
            dist.barrier()
            started = time.perf_counter()
            with PeakRss() as rss:
                if way == "sharded":
                    save_sharded_checkpoint(out / way, 1, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                            scheduler=scheduler, pairs_consumed=world)
                else:
                    model_state, optimizer_state = gather_full_state(model, optimizer)
                    if rank == 0:
                        save_checkpoint(out / way, 1, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                        scheduler=scheduler, pairs_consumed=world, model_state=model_state,
                                        optimizer_state=optimizer_state)
                    del model_state, optimizer_state
                dist.barrier()
            figures[way] = {"seconds": time.perf_counter() - started, "rss_gain_mib": rss.gained / 2**20}
        if rank == 0:
            (out / "figures.json").write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sharded_checkpoint.json"))
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from trainables.checkpointing import MANIFEST
    from trainables.sharded_checkpoint import load_sharded_state
    from trainables.loop import build_optimizer
    from trainables.modeling import load_causal_lm

    root = Path(tempfile.mkdtemp(prefix="sharded-ckpt-"))
    try:
        build_model(root / "model", args.layers, args.hidden)
        weights_mib = (root / "model" / "model.safetensors").stat().st_size / 2**20
        mp.spawn(worker, args=(args.world, str(root / "rendezvous"), str(root / "model"), str(root)),
                 nprocs=args.world, join=True)
        figures = json.loads((root / "figures.json").read_text())
        sharded = root / "sharded" / "step-000001"
        manifest = json.loads((sharded / MANIFEST).read_text())
        per_rank = {r: sum((sharded / f).stat().st_size for f in files if f.startswith("sharded/__")) / 2**20
                    for r, files in manifest["ranks"].items()}
        gathered = root / "gathered" / "step-000001"
        gathered_mib = sum(p.stat().st_size for p in gathered.rglob("*") if p.is_file()) / 2**20
        model = load_causal_lm(str(root / "model"))
        optimizer = build_optimizer(model, 1e-3, 0.0)
        started = time.perf_counter()
        load_sharded_state(sharded, model, optimizer)
        load_seconds = time.perf_counter() - started
        result = {"world": args.world, "weights_mib": weights_mib, "shard_file_mib_per_rank": per_rank,
                  "gathered_checkpoint_mib": gathered_mib, "load_one_process_seconds": load_seconds, **figures,
                  "torch": torch.__version__}
        print(f"model {weights_mib:.0f} MiB of weights, {args.world} gloo ranks on CPU")
        print(f"{'way':10} {'write s':>8} {'rank-0 RSS gain MiB':>20}")
        for way in ("sharded", "gathered"):
            print(f"{way:10} {figures[way]['seconds']:8.2f} {figures[way]['rss_gain_mib']:20.0f}")
        print("shard files per rank (MiB):", {r: round(v, 1) for r, v in per_rank.items()},
              f"| gathered checkpoint {gathered_mib:.0f} MiB | sharded loaded in one process in {load_seconds:.2f} s")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
