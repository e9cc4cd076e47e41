"""Complete-or-absent training checkpoints: HF model + optimizer, scheduler, RNG and data position.

Layout of `<output_dir>/checkpoints/step-000120/`:
    model/               save_pretrained (safetensors) + tokenizer + generation config
    training_state.pt    optimizer, scheduler, RNG states, step, pairs consumed (tensors and plain values;
                         read back with torch.load(weights_only=True), never full pickle)
    manifest.json        sha256 of every file above, written last
A checkpoint is built in a temporary sibling folder and renamed into place, so a crash while writing
leaves nothing that `latest_checkpoint` would pick; a folder whose manifest is missing or whose hashes
do not match is ignored. Tested by `python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from trainables.modeling import save_model_and_tokenizer

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "training_state.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    pairs_consumed: int,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune older ones beyond `keep_last`."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:06d}"
    staging = checkpoints_dir / f".staging-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    save_model_and_tokenizer(model, tokenizer, staging / "model")
    torch.save(
        {
            "step": step,
            "pairs_consumed": pairs_consumed,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "extra": extra or {},
        },
        staging / STATE_FILE,
    )
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {"step": step, "files": {str(p.relative_to(staging)): _sha256(p) for p in files}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if keep_last:
        for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(checkpoint: Path, verify_hashes: bool = True) -> bool:
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    for relative, expected in manifest.get("files", {}).items():
        file = checkpoint / relative
        if not file.is_file() or (verify_hashes and _sha256(file) != expected):
            logger.warning("checkpoint %s is incomplete or corrupt at %s; ignoring it", checkpoint, relative)
            return False
    return True


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (hashes are checked by latest_checkpoint)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.glob("step-*") if (p / MANIFEST).is_file())


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest hashes all match, or None."""
    for candidate in reversed(list_checkpoints(checkpoints_dir)):
        if is_complete(candidate):
            return candidate
    return None


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """Safe load (weights_only): tensors, numbers, strings, lists and dicts only."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
