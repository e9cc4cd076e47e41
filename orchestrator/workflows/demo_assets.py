"""The embedded default world: a tiny random-init model, its tokenizer and the synthetic task's data.

`demo:model`, `demo:preference_train`, ... in a config resolve here, so the quick start needs no hub.
Everything is built locally and deterministically from a seed (same seed -> byte-identical files) into
<cache>/demo-v1-seed<seed>/, where <cache> is $DPO_DEMO_CACHE or ~/.cache/dpo-orchestrator:

    model/              LlamaForCausalLM (~1.1M params) + tokenizer + generation config (save_pretrained)
    data/<split>.jsonl  the splits of trainables.synthetic_task.build_splits
    DEMO_COMPLETE.json  marker with a content hash; written last, checked before reuse

Assets are built in a temporary directory and moved into place with os.replace, so two processes
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
from dataclasses import dataclass
from pathlib import Path

from trainables import synthetic_task

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
DEMO_FORMAT_VERSION = "demo-v1"  # bump when the generated files change, so old caches are not reused
MARKER_FILE = "DEMO_COMPLETE.json"
MODEL_NAME = "model"  # `demo:model`

# The random-init model: small enough for CPU training in minutes, big enough to learn the task.
MODEL_HIDDEN_SIZE = 128
MODEL_LAYERS = 4
MODEL_ATTENTION_HEADS = 4
MODEL_INTERMEDIATE_SIZE = 512
MODEL_MAX_POSITIONS = 128
GENERATION_MAX_NEW_TOKENS = 16  # the longest answer is 10 tokens including eos


@dataclass(frozen=True)
class DemoAssets:
    root: Path  # <cache>/demo-v1-seed<seed>
    model_dir: Path  # load with AutoModelForCausalLM / AutoTokenizer .from_pretrained
    data_files: dict[str, Path]  # split name -> jsonl path (datasets.load_dataset("json", data_files=...))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DPO_DEMO_CACHE") or Path.home() / ".cache" / "dpo-orchestrator").expanduser()


def _assets_at(root: Path) -> DemoAssets:
    data_files = {path.stem: path for path in sorted((root / "data").glob("*.jsonl"))}
    return DemoAssets(root=root, model_dir=root / MODEL_NAME, data_files=data_files)


def _content_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes, the marker excluded."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER_FILE):
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
    _write_data(splits, directory / "data")
    tokenizer = build_tokenizer(splits)
    model = build_model(tokenizer, seed)
    model_dir = directory / MODEL_NAME
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    marker = {"format_version": DEMO_FORMAT_VERSION, "seed": seed, "content_sha256": _content_hash(directory)}
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def build_demo_assets(cache_dir: Path | None = None, seed: int = 0, force: bool = False) -> DemoAssets:
    """Build (or reuse a complete, hash-checked copy of) the demo model and data for a seed."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"{DEMO_FORMAT_VERSION}-seed{seed}"
    if not force and _is_complete(root, seed):
        return _assets_at(root)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=cache))
    try:
        logger.info("building demo assets (seed %d) in %s", seed, root)
        _build_into(staging, seed)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        if not force and _is_complete(root, seed):
            return _assets_at(root)  # another process finished first: keep the copy it may be reading
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
    return _assets_at(root)


def resolve_demo_path(value: str, cache_dir: Path | None = None, seed: int = 0) -> str:
    """`demo:model` -> the model directory, `demo:<split>` -> that split's jsonl; other values unchanged."""
    if not value.startswith(DEMO_PREFIX):
        return value
    name = value[len(DEMO_PREFIX):]
    assets = build_demo_assets(cache_dir=cache_dir, seed=seed)
    if name == MODEL_NAME:
        return str(assets.model_dir)
    if name in assets.data_files:
        return str(assets.data_files[name])
    valid = [DEMO_PREFIX + MODEL_NAME] + [DEMO_PREFIX + split for split in sorted(assets.data_files)]
    raise ValueError(f"unknown demo asset {value!r}; valid names are {valid}")
