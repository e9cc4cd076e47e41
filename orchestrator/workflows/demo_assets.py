"""The embedded default world: a tiny model, its tokenizer, the synthetic task's data and an SFT model.

`demo:model`, `demo:sft_model`, `demo:preference_train`, ... in a config resolve here, so the quick start
needs no hub. Everything is built locally and deterministically from a seed (same seed and machine ->
byte-identical files) into <cache>/demo-v2-seed<seed>/, where <cache> is $DPO_DEMO_CACHE or
~/.cache/dpo-orchestrator:

    model/              random-init LlamaForCausalLM (~1.1M params) + tokenizer + generation config
    data/<split>.jsonl  the splits of trainables.synthetic_task.build_splits
    DEMO_COMPLETE.json  marker with a content hash of model/ and data/; written last, checked before reuse
    sft_model/          model/ after SFT on data/sft_train.jsonl, trained by the project's own SFT engine
                        (trainables.entrypoints.run_sft, as `dpo sft` runs it); built on first request
    SFT_COMPLETE.json   its marker: content hash, the base assets' hash it was trained from, the SFT run

Why an SFT model: DPO alone never teaches a random model to *write* the answers (docs/embedded-default.md),
so the quick start runs DPO from this model, as the usual recipe does (SFT first, then DPO with policy
and reference copied from the SFT model). It costs a minute or so of CPU once; `demo:model` alone (the
study's base, most tests) never pays for it.

Both parts are built in a temporary directory and moved into place with os.replace, so two processes
that race both end up using one complete copy. Build by hand with `dpo demo-assets`; tested by
`python -m pytest tests/test_demo_assets.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainables import synthetic_task

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
DEMO_FORMAT_VERSION = "demo-v2"  # bump when the generated files change, so old caches are not reused
MARKER_FILE = "DEMO_COMPLETE.json"
MODEL_NAME = "model"  # `demo:model`
DATA_FOLDER = "data"
SFT_MODEL_NAME = "sft_model"  # `demo:sft_model`
SFT_MARKER_FILE = "SFT_COMPLETE.json"

# The random-init model: small enough for CPU training in minutes, big enough to learn the task.
MODEL_HIDDEN_SIZE = 128
MODEL_LAYERS = 4
MODEL_ATTENTION_HEADS = 4
MODEL_INTERMEDIATE_SIZE = 512
MODEL_MAX_POSITIONS = 128
GENERATION_MAX_NEW_TOKENS = 16  # the longest answer is 10 tokens including eos


@dataclass(frozen=True)
class DemoAssets:
    root: Path  # <cache>/demo-v2-seed<seed>
    model_dir: Path  # load with AutoModelForCausalLM / AutoTokenizer .from_pretrained
    data_files: dict[str, Path]  # split name -> jsonl path (datasets.load_dataset("json", data_files=...))
    sft_model_dir: Path | None = None  # the SFT model (same loading); None when it was not asked for


def default_cache_dir() -> Path:
    return Path(os.environ.get("DPO_DEMO_CACHE") or Path.home() / ".cache" / "dpo-orchestrator").expanduser()


def _assets_at(root: Path) -> DemoAssets:
    data_files = {path.stem: path for path in sorted((root / DATA_FOLDER).glob("*.jsonl"))}
    return DemoAssets(root=root, model_dir=root / MODEL_NAME, data_files=data_files)


def _content_hash(root: Path, folders: tuple[str, ...] = (MODEL_NAME, DATA_FOLDER)) -> str:
    """sha256 over the relative path and bytes of every file under `folders` of root.

    The base marker covers model/ and data/ only, so adding sft_model/ later leaves the base assets valid.
    """
    digest = hashlib.sha256()
    files = sorted(p for folder in folders for p in (root / folder).rglob("*") if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _is_complete(root: Path, seed: int) -> bool:
    marker = root / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        recorded.get("format_version") == DEMO_FORMAT_VERSION
        and recorded.get("seed") == seed
        and recorded.get("content_sha256") == _content_hash(root)
    )


def _write_data(splits: dict[str, list[dict]], data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    for name, rows in splits.items():
        with (data_dir / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _training_texts(splits: dict[str, list[dict]]) -> list[str]:
    """Every string in every split: the tokenizer's vocabulary must cover all of them."""
    return [value for rows in splits.values() for row in rows for value in row.values()]


def build_tokenizer(splits: dict[str, list[dict]]):
    """A WordLevel tokenizer trained on the task text (digits split one by one), chat template attached."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token=synthetic_task.UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"[=.,!?]"), behavior="isolated"),
        ]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=list(synthetic_task.SPECIAL_TOKENS), min_frequency=1)
    texts = _training_texts(splits)
    for special in synthetic_task.SPECIAL_TOKENS:
        texts = [text.replace(special, " ") for text in texts]
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=synthetic_task.BOS_TOKEN,
        eos_token=synthetic_task.EOS_TOKEN,
        pad_token=synthetic_task.PAD_TOKEN,
        unk_token=synthetic_task.UNK_TOKEN,
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=synthetic_task.CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_POSITIONS,
        padding_side="right",
    )


def build_model(tokenizer, seed: int):
    """A random-init LlamaForCausalLM sized for CPU training; same seed -> same weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=MODEL_HIDDEN_SIZE,
        intermediate_size=MODEL_INTERMEDIATE_SIZE,
        num_hidden_layers=MODEL_LAYERS,
        num_attention_heads=MODEL_ATTENTION_HEADS,
        num_key_value_heads=MODEL_ATTENTION_HEADS,
        max_position_embeddings=MODEL_MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=GENERATION_MAX_NEW_TOKENS,
        do_sample=False,
    )
    return model


def _build_into(directory: Path, seed: int) -> None:
    splits = synthetic_task.build_splits(seed)
    _write_data(splits, directory / DATA_FOLDER)
    tokenizer = build_tokenizer(splits)
    model = build_model(tokenizer, seed)
    model_dir = directory / MODEL_NAME
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    marker = {"format_version": DEMO_FORMAT_VERSION, "seed": seed, "content_sha256": _content_hash(directory)}
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


# ---- the SFT model: the project's own `dpo sft` on data/sft_train.jsonl -----------------------------

# 300 steps of 32 examples (2.4 epochs of sft_train): exact match 0.935 on the benchmark split. The model
# answers most prompts and still makes the mistakes the preference pairs are about, so the quickstart's DPO
# has something to fix; 400 steps reach 0.995 and leave DPO nothing to show (docs/embedded-default.md).
# Under a minute on one CPU thread of an idle machine.
SFT_STEPS = 300
SFT_LEARNING_RATE = 1e-3
SFT_BATCH_SIZE = 32
SFT_WARMUP_STEPS = 10
# One thread whatever OMP_NUM_THREADS or the core count say: a matmul split over another number of threads
# may round differently, and the weights must come out the same on every machine for a seed.
SFT_THREADS = 1


def sft_config(root: Path, work_dir: Path, seed: int, steps: int = SFT_STEPS):
    """The config `dpo sft` runs to make the demo SFT model from root's model/ and data/ (validated by the
    config schema like any other; written under work_dir)."""
    from orchestrator.config.schema import ExperimentConfig

    data = root / DATA_FOLDER
    return ExperimentConfig.model_validate({
        "name": "demo-sft", "output_dir": str(work_dir),
        "model": {"path": str(root / MODEL_NAME)},
        "data": {"train": str(data / "preference_train.jsonl"), "sft_train": str(data / "sft_train.jsonl"),
                 "sft_eval": str(data / "sft_eval.jsonl"), "max_length": 64},
        "train": {"learning_rate": SFT_LEARNING_RATE, "batch_size": SFT_BATCH_SIZE, "max_steps": steps,
                  "warmup_steps": min(SFT_WARMUP_STEPS, steps - 1), "eval_every": steps, "checkpoint_every": steps,
                  "keep_checkpoints": 1, "log_every": steps, "seed": seed, "device": "cpu", "precision": "fp32"},
        "tracking": {"enabled": False},
    })


def _train_sft_model(root: Path, staging: Path, seed: int, steps: int) -> dict[str, Any]:
    """Run the SFT engine in this process; leaves staging/sft_model and returns what the marker records."""
    import torch

    from orchestrator.config.spec import resolve_run
    from trainables.checkpointing import latest_checkpoint
    from trainables.entrypoints import run_sft
    from trainables.lineage import recorded_lineage

    work = staging / "run"
    spec = resolve_run(sft_config(root, work, seed, steps), stage="sft", show_progress=False)
    last: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(SFT_THREADS)
    try:
        run_sft(spec.model, spec.data, spec.loop, spec.runtime,
                lambda metrics, checkpoint_dir: last.update(metrics))
    finally:
        torch.set_num_threads(threads)
    checkpoint = latest_checkpoint(work / "checkpoints")
    if checkpoint is None or checkpoint.name != f"step-{steps:06d}":
        raise RuntimeError(f"the demo SFT run in {work} ended without its step-{steps} checkpoint; this is a bug")
    lineage = recorded_lineage(checkpoint) or {}
    os.replace(checkpoint / "model", staging / SFT_MODEL_NAME)
    shutil.rmtree(work)
    return {
        "trained_by": "trainables.entrypoints.run_sft (the engine of `dpo sft`)",
        "stage": lineage.get("stage"), "data": lineage.get("data"), "steps": steps,
        "learning_rate": SFT_LEARNING_RATE, "batch_size": SFT_BATCH_SIZE,
        "metrics": {key: last[key] for key in ("train/loss", "eval/loss") if key in last},
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _sft_is_complete(root: Path, seed: int, steps: int) -> bool:
    """The SFT marker matches this version, seed, step count, the base assets it was trained from, and
    the bytes of sft_model/."""
    recorded = _read_json(root / SFT_MARKER_FILE)
    return (
        bool(recorded)
        and recorded.get("format_version") == DEMO_FORMAT_VERSION
        and recorded.get("seed") == seed
        and recorded.get("steps") == steps
        and recorded.get("base_sha256") == _read_json(root / MARKER_FILE).get("content_sha256")
        and recorded.get("content_sha256") == _content_hash(root, (SFT_MODEL_NAME,))
    )


def _build_sft_model(root: Path, seed: int, steps: int) -> None:
    """Train the SFT model into a staging folder beside root, then move it into root (marker last)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.sft-building-", dir=root.parent))
    try:
        logger.info("building the demo SFT model: %d steps of `dpo sft` from %s (about a minute)", steps,
                    root / MODEL_NAME)
        record = _train_sft_model(root, staging, seed, steps)
        if _sft_is_complete(root, seed, steps):
            return  # another process finished first: keep the copy it may be reading
        (root / SFT_MARKER_FILE).unlink(missing_ok=True)  # first, so a half-replaced folder never looks complete
        target = root / SFT_MODEL_NAME
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.sft-old-", dir=root.parent))
            try:
                os.replace(target, aside / SFT_MODEL_NAME)
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(staging / SFT_MODEL_NAME, target)
        except OSError:
            if _sft_is_complete(root, seed, steps):
                return
            raise OSError(f"could not move the freshly trained demo SFT model into {target}: it exists but is "
                          "incomplete. Delete it (or run `dpo demo-assets --force`) and retry.") from None
        marker = {"format_version": DEMO_FORMAT_VERSION, "seed": seed,
                  "base_sha256": _read_json(root / MARKER_FILE).get("content_sha256"),
                  "content_sha256": _content_hash(root, (SFT_MODEL_NAME,)), **record}
        written = staging / SFT_MARKER_FILE
        written.write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(written, root / SFT_MARKER_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- building and resolving ----------------------------------------------------------------------

def _build_base(cache: Path, root: Path, seed: int, force: bool) -> None:
    """Build model/ and data/ (with the base marker) and move them into place as root."""
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=cache))
    try:
        logger.info("building demo assets (seed %d) in %s", seed, root)
        _build_into(staging, seed)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        if not force and _is_complete(root, seed):
            return  # another process finished first: keep the copy it may be reading
        if root.exists():
            # Incomplete, stale, or force: move it aside (atomic), then put the new copy in place.
            aside = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=cache))
            try:
                os.replace(root, aside / "assets")
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(staging, root)
        except OSError:
            # Another process put a copy in place between our check and our move; use theirs if complete.
            if not _is_complete(root, seed):
                raise OSError(
                    f"could not move freshly built demo assets into {root}: it exists but is incomplete. "
                    "Delete it (or pass force=True / `dpo demo-assets --force`) and retry."
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_demo_assets(cache_dir: Path | None = None, seed: int = 0, force: bool = False, *,
                      sft_model: bool = True, sft_steps: int = SFT_STEPS) -> DemoAssets:
    """Build (or reuse a complete, hash-checked copy of) the demo model, data and, with sft_model, the SFT model.

    sft_steps: SFT steps of the SFT model (tests use a few to check determinism cheaply); a copy made with
    another number is rebuilt.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"{DEMO_FORMAT_VERSION}-seed{seed}"
    if force or not _is_complete(root, seed):
        _build_base(cache, root, seed, force)
    assets = _assets_at(root)
    if not sft_model:
        return assets
    if force or not _sft_is_complete(root, seed, sft_steps):
        _build_sft_model(root, seed, sft_steps)
    return replace(assets, sft_model_dir=root / SFT_MODEL_NAME)


def resolve_demo_path(value: str, cache_dir: Path | None = None, seed: int = 0) -> str:
    """`demo:model` / `demo:sft_model` -> that model's directory, `demo:<split>` -> that split's jsonl;
    other values unchanged. The SFT model is trained (once) only when it is asked for."""
    if not value.startswith(DEMO_PREFIX):
        return value
    name = value[len(DEMO_PREFIX):]
    if name == SFT_MODEL_NAME:
        return str(build_demo_assets(cache_dir=cache_dir, seed=seed).sft_model_dir)
    assets = build_demo_assets(cache_dir=cache_dir, seed=seed, sft_model=False)
    if name == MODEL_NAME:
        return str(assets.model_dir)
    if name in assets.data_files:
        return str(assets.data_files[name])
    valid = [DEMO_PREFIX + MODEL_NAME, DEMO_PREFIX + SFT_MODEL_NAME] + [
        DEMO_PREFIX + split for split in sorted(assets.data_files)]
    raise ValueError(f"unknown demo asset {value!r}; valid names are {valid}")
