"""Sharded checkpoints of FSDP runs over several ranks: each rank writes and hashes its own shards, any world loads them.

`save_sharded_checkpoint` writes step-NNNNNN/ with torch.distributed.checkpoint (no rank gathers the full
weights or optimizer state) through the staging, manifest and pruning of trainables/checkpointing.py, so a
sharded checkpoint is complete-or-absent like any other; `load_sharded_state` reads the parts of the saved
shards that overlap this world's shards (any number of ranks, or one process with no process group), after
the ranks have checked the shards' hashes between them. Under LoRA only trainable tensors are saved.
Tested by `python -m pytest tests/test_sharded_checkpoint.py tests/test_sharded_resume.py tests/test_fsdp.py -q`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainables.checkpointing import (MANIFEST, SHARDED_DIR, SHARDED_FORMAT, STATE_FILE, CheckpointError, _in_a_world,
                                      _no_space_left, _put_in_place, _run_id, _sha256, _staging_for, _training_state,
                                      _write_manifest)
from trainables.lineage import LINEAGE_KEY


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # ignore_frozen_params: under LoRA only the trainable (adapter) tensors and their optimizer state are saved
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _trainable_only(model: torch.nn.Module, model_state: dict[str, Any]) -> dict[str, Any]:
    """model_state without frozen tensors under any of their names. ignore_frozen_params drops a frozen parameter
    under its first name only, so under LoRA a tied LM head (an alias of the frozen embedding) was still saved."""
    frozen = {name for name, parameter in model.named_parameters(remove_duplicate=False) if not parameter.requires_grad}
    return {key: value for key, value in model_state.items() if key not in frozen}


def _shared_from_rank0(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _save_config_and_tokenizer(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """What export needs beside the weights: the model's config (or LoRA adapter config) and the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    peft_config = getattr(unwrapped, "peft_config", None)
    if peft_config:  # a PeftModel: adapter_config.json, as save_pretrained writes it beside the adapter weights
        peft_config["default"].save_pretrained(str(directory))
    else:
        unwrapped.config.save_pretrained(directory)
        generation = getattr(unwrapped, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_sharded_checkpoint(
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
    """Write checkpoint `step` of a sharded (FSDP) model with torch.distributed.checkpoint; every rank calls it.

    Layout of step-NNNNNN/ (same atomic protocol as save_checkpoint: staged in rank 0's .staging- folder, renamed
    into place after manifest.json is written):
        sharded/             dcp.save of {"model", "optimizer"} from get_state_dict: each rank writes its own
                             shards (__<rank>_0.distcp), rank 0 the .metadata; under LoRA only trainable tensors
        model/               config.json + generation config (or adapter_config.json under LoRA) + tokenizer
        training_state.pt    as save_checkpoint's, with "optimizer": None (the optimizer is in sharded/)
        manifest.json        "format": "sharded", the saving world size, the sha256 and size of every file: each
                             rank hashes only the files it wrote; rank 0 gathers them. On resume the ranks split
                             the shards' hashing between them (load_sharded_state)
    No rank gathers full tensors and no rank re-reads another's files. Returns the checkpoint on every rank.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    final = checkpoints_dir / f"step-{step:06d}"  # the same name _staging_for gives on rank 0
    run_id = _run_id((extra or {}).get(LINEAGE_KEY))
    prepared: tuple[str | None, str | None] = (None, None)
    if rank == 0:  # the checks and the staging folder of save_checkpoint, once; their outcome goes to every rank
        try:
            _, staging = _staging_for(checkpoints_dir, step, run_id)
            (staging / SHARDED_DIR).mkdir(parents=True)
            prepared = (str(staging), None)
        except (CheckpointError, OSError) as error:
            prepared = (None, str(error))
    staging_name, problem = _shared_from_rank0(prepared)
    if problem:
        raise CheckpointError(problem)
    staging = Path(staging_name)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    model_state = _trainable_only(model, model_state)
    outcome: tuple[str | None, str | None] = (None, None)
    try:
        with _no_space_left(checkpoints_dir, staging, step):
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     storage_writer=FileSystemWriter(str(staging / SHARDED_DIR), thread_count=1))
            mine = sorted(staging.glob(f"{SHARDED_DIR}/__{rank}_*.distcp"))
            if rank == 0:
                mine.append(staging / SHARDED_DIR / ".metadata")
                _save_config_and_tokenizer(model, tokenizer, staging / "model")
                torch.save(_training_state(step, pairs_consumed, None, scheduler, extra), staging / STATE_FILE)
                mine += sorted(p for p in (staging / "model").rglob("*") if p.is_file()) + [staging / STATE_FILE]
            hashes = {str(p.relative_to(staging)): [_sha256(p), p.stat().st_size] for p in mine}
    except CheckpointError as error:
        hashes = {"": str(error)}
    gathered: list[dict[str, str]] | None = [{} for _ in range(world)] if rank == 0 else None
    dist.gather_object(hashes, gathered, dst=0)
    if rank == 0:
        try:
            failed = [part[""] for part in gathered if "" in part]
            if failed:
                raise CheckpointError(failed[0])
            files = {name: value for part in gathered for name, value in part.items()}
            _write_manifest(staging, {"step": step, "format": SHARDED_FORMAT, "world_size": world,
                                      "files": {name: files[name][0] for name in sorted(files)},
                                      "sizes": {name: files[name][1] for name in sorted(files)},
                                      "ranks": {str(r): sorted(part) for r, part in enumerate(gathered)}}, extra)
            outcome = (str(_put_in_place(staging, final, keep_last, run_id)), None)
        except (CheckpointError, OSError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            outcome = (None, str(error))
    saved, problem = _shared_from_rank0(outcome)
    if problem:
        raise CheckpointError(problem)
    return Path(saved)


def load_sharded_state(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint's model (and optimizer) state into this world's model, whatever its world size.

    dcp.load reads, on each rank, the parts of the saved shards that overlap this rank's own shards (FSDP over
    any number of ranks) or whole tensors (one process, no process group), and set_state_dict puts them into
    the model and optimizer. Under LoRA the frozen base weights are not in the checkpoint: they stay as loaded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    _verify_shards_together(Path(checkpoint))
    reader = FileSystemReader(str(Path(checkpoint) / SHARDED_DIR))
    # not strict: under LoRA the frozen base weights are absent on purpose; any trainable tensor missing is refused
    options = _state_options(strict=False)
    if optimizer is None:
        state = {"model": _trainable_only(model, get_model_state_dict(model, options=options))}
        dcp.load(state, storage_reader=reader)
        result = set_model_state_dict(model, state["model"], options=options)
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        state = {"model": _trainable_only(model, model_state), "optimizer": optimizer_state}
        dcp.load(state, storage_reader=reader)
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                                options=options)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{checkpoint} does not fit this model: {len(missing)} trainable tensors missing "
                              f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]} (saved for another model "
                              "or LoRA setting)")


def _verify_shards_together(checkpoint: Path) -> None:
    """The sha256 of a sharded checkpoint's shard files, checked by the ranks of this world together: rank r
    hashes files r, r+W, ..., and every rank learns of any mismatch (a collective; nothing to do in one process,
    where checkpoint_problem hashed them all)."""
    if not _in_a_world():
        return
    import torch.distributed as dist

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    shards = sorted(name for name in manifest["files"] if name.startswith(f"{SHARDED_DIR}/"))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = next((f"{name} does not match its sha256 in {MANIFEST} (truncated or altered)" for name in shards[rank::world]
                 if _sha256(checkpoint / name) != manifest["files"][name]), None)
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, mine)
    found = next((problem for problem in problems if problem), None)
    if found:
        raise CheckpointError(f"cannot resume from {checkpoint}: {found}. Resume from an earlier checkpoint or start afresh.")
