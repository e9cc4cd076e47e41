"""What a checkpoint records about the run that wrote it, and the check that a resume continues that run.

Every engine checkpoint carries a lineage (in training_state.pt's `extra` and in manifest.json):

    run_id        one id per run; a resumed run keeps its checkpoint's id, so pruning (keep_checkpoints)
                  deletes only checkpoints of this run, never another run's
    stage         dpo | sft
    model         {"path", "fingerprint"}: the model the run started from (content sample of a local
                  folder: config.json, weight file names, sizes and spread-out blocks; name@revision on the hub)
    tokenizer     {"path", "fingerprint"}: vocabulary, merges, special tokens and chat template
    reference     {"path", "fingerprint"}: DPO's reference model (when it has one)
    data          {"train": fingerprint, "eval": fingerprint}: the rows as tokenised and truncated

`check_resume` refuses (CheckpointError) a checkpoint whose lineage differs from the run's, naming what
differs; a checkpoint written before lineages existed is accepted with a warning. Tested by
`python -m pytest tests/test_adversarial_outputs.py tests/test_engine.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from array import array
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

LINEAGE_KEY = "lineage"
COMPARED = ("stage", "model", "tokenizer", "reference", "data.train", "data.eval")
WHAT = {
    "stage": "the stage", "model": "the model (model.path)", "tokenizer": "the tokenizer (model.tokenizer_path)",
    "reference": "the reference model (reference.path)", "data.train": "the training data (after tokenisation and truncation)",
    "data.eval": "the held-out data (after tokenisation and truncation)",
}
SAMPLED_BLOCKS, BLOCK_BYTES = 16, 1 << 16


def model_identity(path: str, revision: str | None = None) -> dict[str, str]:
    """{"path", "fingerprint"} of a model: sampled content of a local folder, name@revision on the hub.

    A local folder is fingerprinted by config.json and, for every weight file, its name, size and 16
    blocks spread over it: two different trainings of one architecture differ in every block, and reading
    1 MiB per file costs nothing next to loading the model.
    """
    local = Path(path).expanduser()
    digest = hashlib.sha256()
    if not local.is_dir():
        digest.update(f"hub:{path}@{revision or 'main'}".encode())
        return {"path": path, "fingerprint": digest.hexdigest()[:16]}
    files = sorted(local.glob("config.json")) + sorted(local.glob("*.safetensors")) + sorted(local.glob("adapter_*"))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            for index in range(SAMPLED_BLOCKS if size > SAMPLED_BLOCKS * BLOCK_BYTES else 1):
                handle.seek(index * max(0, size - BLOCK_BYTES) // max(1, SAMPLED_BLOCKS - 1))
                digest.update(handle.read(BLOCK_BYTES if size > SAMPLED_BLOCKS * BLOCK_BYTES else size))
    return {"path": path, "fingerprint": digest.hexdigest()[:16]}


def tokenizer_identity(tokenizer, path: str) -> dict[str, str]:
    """{"path", "fingerprint"}: the tokenizer's vocabulary and rules, special tokens and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {name: str(value) for name, value in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    digest.update(json.dumps([specials, str(getattr(tokenizer, "chat_template", None) or "")]).encode())
    return {"path": path, "fingerprint": digest.hexdigest()[:16]}


def rows_fingerprint(rows: Iterable[Any]) -> str:
    """sha256 (16 hex digits) of tokenised rows (TokenizedPair / TokenizedExample: tuples of token ids)."""
    digest = hashlib.sha256()
    count = 0
    for row in rows:
        for field in fields(row):
            digest.update(array("q", getattr(row, field.name)).tobytes())
            digest.update(b"|")
        digest.update(b"\n")
        count += 1
    digest.update(f"rows:{count}".encode())
    return digest.hexdigest()[:16]


def run_lineage(*, stage: str, model_args, tokenizer, train: Sequence[Any], eval: Sequence[Any],
                reference_path: str | None = None) -> dict[str, Any]:
    """The lineage a run's checkpoints record (run_id filled in by `resume_lineage`)."""
    lineage: dict[str, Any] = {
        "run_id": None, "stage": stage,
        "model": model_identity(model_args.path, model_args.revision),
        "tokenizer": tokenizer_identity(tokenizer, model_args.tokenizer_path or model_args.path),
        "data": {"train": rows_fingerprint(train), "eval": rows_fingerprint(eval)},
    }
    if reference_path is not None:
        lineage["reference"] = (lineage["model"] if reference_path == model_args.path
                                else model_identity(reference_path, model_args.revision))
    return lineage


def recorded_lineage(checkpoint: Path) -> dict[str, Any] | None:
    """The lineage in a checkpoint's manifest.json, or None (a checkpoint written before lineages)."""
    try:
        manifest = json.loads((Path(checkpoint) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    lineage = manifest.get(LINEAGE_KEY) if isinstance(manifest, dict) else None
    return lineage if isinstance(lineage, dict) else None


def _value(lineage: dict[str, Any], key: str) -> Any:
    if key.startswith("data."):
        return (lineage.get("data") or {}).get(key.split(".", 1)[1])
    return lineage.get(key)


def _shown(key: str, value: Any) -> str:
    if isinstance(value, dict):
        text = f"{value.get('path')} (fingerprint {value.get('fingerprint')})"
    else:
        text = str(value) if key == "stage" else f"fingerprint {value}"
    return text if len(text) <= 100 else text[:97] + "..."


def differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's lineage and this run's, in words (keys absent on either side skipped)."""
    found = []
    for key in COMPARED:
        old, new = _value(recorded, key), _value(expected, key)
        if old is None or new is None:
            continue
        if key == "reference" and old == recorded.get("model") and new == expected.get("model"):
            continue  # the reference is the model on both sides: said once
        same = old.get("fingerprint") == new.get("fingerprint") if isinstance(old, dict) and isinstance(new, dict) else old == new
        if not same:
            found.append(f"{WHAT[key]}: checkpoint {_shown(key, old)}, this run {_shown(key, new)}")
    return found


def resume_lineage(checkpoint: Path | None, lineage: dict[str, Any]) -> dict[str, Any]:
    """This run's lineage with its run_id: the checkpoint's when resuming (after checking it), else a new one.

    Raises CheckpointError (trainables/checkpointing.py) naming every difference when the checkpoint belongs to another model, tokenizer, data or stage.
    """
    lineage = dict(lineage)
    if checkpoint is None:
        return {**lineage, "run_id": uuid.uuid4().hex}
    recorded = recorded_lineage(checkpoint)
    if recorded is None:
        logger.warning("train.resume_from: checkpoint %s records no model, tokenizer or data fingerprints (written "
                       "by an older version); resuming without checking that it belongs to this run", checkpoint)
        return {**lineage, "run_id": uuid.uuid4().hex}
    found = differences(recorded, lineage)
    if found:
        from trainables.checkpointing import CheckpointError

        raise CheckpointError(
            f"train.resume_from: checkpoint {checkpoint} belongs to another run; " + "; ".join(found)
            + ". Resume only a checkpoint of this run (same model, tokenizer and data), or start afresh without "
            "train.resume_from (in a new output_dir).")
    return {**lineage, "run_id": str(recorded.get("run_id") or uuid.uuid4().hex)}
