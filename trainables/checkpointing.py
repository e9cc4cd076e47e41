"""Complete-or-absent training checkpoints: HF model + optimizer, scheduler, RNG and data position.

Layout of `<output_dir>/checkpoints/step-000120/`:
    model/               save_pretrained (safetensors) + tokenizer + generation config
    training_state.pt    optimizer, scheduler, RNG states, step, pairs consumed (tensors and plain values;
                         read back with torch.load(weights_only=True), never full pickle)
    manifest.json        sha256 of every file above, written last
A checkpoint is built in a temporary sibling folder and renamed into place, so a crash while writing
leaves nothing that `latest_checkpoint` would pick; a folder whose manifest is missing or whose hashes
do not match is ignored, and `load_training_state` refuses one (CheckpointError) instead of resuming from
it. Staging folders left by a crashed process are removed by the next save. The manifest also holds the
run's lineage (trainables/lineage.py: run id, model, tokenizer and data fingerprints): pruning beyond
`keep_last` deletes only checkpoint folders of the same run id (never another run's, never a link), and a
save never replaces another run's checkpoint of the same step. A save that runs out of disk space removes
its staging folder and raises DiskFullError naming the folder and the space needed. Tested by
`python -m pytest tests/test_engine.py tests/test_reliability.py -q`.

Under FSDP with several ranks the checkpoint is sharded instead (trainables/sharded_checkpoint.py:
`sharded/` holds torch.distributed.checkpoint files, one per rank, and `model/` no weights), with the same
staging, manifest and pruning (the helpers below); it loads into any world size, and `dpo export`
consolidates it. checkpoint_problem checks its shard files by size from a rank of a distributed world.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from trainables.errors import UserError
from trainables.lineage import LINEAGE_KEY, recorded_lineage
from trainables.modeling import save_model_and_tokenizer
from trainables.processes import pid_alive

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "training_state.pt"
STAGING_PREFIX = ".staging-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from: incomplete, corrupt, or holding more than plain data."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """CPU, Python and (with CUDA) this process's current device's RNG state: each rank uses one device."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state(); the CUDA state goes to the current device, whichever devices are visible now.

    Older checkpoints hold one state per visible device (get_rng_state_all): the first, the device the saving
    rank trained on, is restored. Indexing devices by saved position failed when a run resumed with fewer
    visible GPUs (IndexError), as under Ray, where each worker sees its own GPU(s) only.
    """
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    saved = state.get("cuda")
    if saved is None or not torch.cuda.is_available():
        return
    if isinstance(saved, (list, tuple)):
        if not saved:
            return
        saved = saved[0]
    torch.cuda.set_rng_state(saved)


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
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune older ones beyond `keep_last`.

    model_state / optimizer_state: full states gathered from a sharded (FSDP) model and optimizer
    (trainables/sharding.py), written instead of model.state_dict() / optimizer.state_dict(), so the
    checkpoint has the same layout as one of a single process.
    """
    run_id = _run_id((extra or {}).get(LINEAGE_KEY))
    final, staging = _staging_for(checkpoints_dir, step, run_id)
    with _no_space_left(checkpoints_dir, staging, step):  # a full disk: staging removed, DiskFullError
        save_model_and_tokenizer(model, tokenizer, staging / "model", state_dict=model_state)
        optimizer_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        torch.save(_training_state(step, pairs_consumed, optimizer_state, scheduler, extra), staging / STATE_FILE)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        _write_manifest(staging, {"step": step, "files": {str(p.relative_to(staging)): _sha256(p) for p in files}}, extra)
    return _put_in_place(staging, final, keep_last, run_id)


# ---- what both formats share: checks and staging, the training state, the manifest, renaming and pruning ----

def _staging_for(checkpoints_dir: Path, step: int, run_id: str | None) -> tuple[Path, Path]:
    """(final, staging) folders of checkpoint `step`, after the checks every save makes: no link as the checkpoints
    folder, no other run's checkpoint of this step replaced; abandoned staging folders removed, a fresh own one."""
    if checkpoints_dir.is_symlink():
        raise CheckpointError(f"{checkpoints_dir} is a symbolic link; checkpoints are written only into a real "
                              "folder of the run (remove the link or choose another output_dir)")
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(checkpoints_dir)
    final = checkpoints_dir / f"step-{step:06d}"
    _check_replaceable(final, run_id)
    staging = checkpoints_dir / f"{STAGING_PREFIX}step-{step:06d}-{os.getpid()}"
    if staging.is_symlink():
        staging.unlink()  # a link where this process stages its save: never written through
    shutil.rmtree(staging, ignore_errors=True)
    return final, staging


def _training_state(step: int, pairs_consumed: int, optimizer_state: dict[str, Any] | None, scheduler,
                    extra: dict[str, Any] | None) -> dict[str, Any]:
    """training_state.pt's content (optimizer_state None: the optimizer is in the sharded files)."""
    return {"step": step, "pairs_consumed": pairs_consumed, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {}}


def _write_manifest(staging: Path, manifest: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """manifest.json, written last into the staging folder: the files' hashes and the run's lineage."""
    if (extra or {}).get(LINEAGE_KEY):
        manifest[LINEAGE_KEY] = extra[LINEAGE_KEY]
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


def _put_in_place(staging: Path, final: Path, keep_last: int | None, run_id: str | None) -> Path:
    """Rename the complete staging folder into place, then delete this run's checkpoints beyond keep_last."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if keep_last and run_id:
        for old in own_checkpoints(final.parent, run_id)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


SHARDED_DIR = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint files (one per rank + .metadata)
SHARDED_FORMAT = "sharded"


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    """A checkpoint written by save_sharded_checkpoint (torch.distributed.checkpoint files in sharded/)."""
    try:
        return json.loads((Path(checkpoint) / MANIFEST).read_text()).get("format") == SHARDED_FORMAT
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


class DiskFullError(CheckpointError):
    """A checkpoint could not be written for lack of space; the previous checkpoints are untouched."""


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) if folder.is_dir() else 0


@contextlib.contextmanager
def _no_space_left(checkpoints_dir: Path, staging: Path, step: int):
    """Turn ENOSPC / EDQUOT while staging checkpoint `step` into DiskFullError naming the folder and the space
    needed (the newest complete checkpoint's size, else at least what was written), after removing the staging
    folder: the checkpoints already there stay as they were, and the newest is the one to resume from."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = _folder_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        previous = next((c for c in reversed(list_checkpoints(checkpoints_dir)) if checkpoint_problem(c, False) is None), None)
        needed = _folder_bytes(previous) if previous else written
        basis = f"the size of {previous.name}" if previous else "at least what was written before the disk filled"
        free = shutil.disk_usage(checkpoints_dir).free
        mb = 1024 * 1024
        kept = (f"the previous checkpoint {previous} is intact: resume from it with train.resume_from=latest"
                if previous else "no earlier checkpoint exists")
        raise DiskFullError(
            f"no space left to write checkpoint step-{step:06d} in {checkpoints_dir} ({error.strerror}): it needs about "
            f"{needed / mb:,.1f} MiB ({basis}) and {free / mb:,.1f} MiB are free. The partial checkpoint was removed; "
            f"{kept}. Free space there (the older checkpoints of train.keep_checkpoints are deleted only after the "
            "new one is written, so one more checkpoint must fit)") from None


def _run_id(lineage: Any) -> str | None:
    return str(lineage["run_id"]) if isinstance(lineage, dict) and lineage.get("run_id") else None


def _check_replaceable(final: Path, run_id: str | None) -> None:
    """Refuse to replace a link, or a checkpoint of the same step that another run wrote."""
    if final.is_symlink():
        raise CheckpointError(f"{final} is a symbolic link; it is not replaced (checkpoints are written only into "
                              "real folders of the run). Remove the link or choose another output_dir.")
    if not final.exists():
        return
    other = _run_id(recorded_lineage(final))
    if other and other != run_id:
        raise CheckpointError(f"{final} holds a checkpoint of another run (run id {other}); it is not replaced. "
                              "Write this run into its own output_dir.")


def own_checkpoints(checkpoints_dir: Path, run_id: str) -> list[Path]:
    """Complete-looking checkpoint folders (real folders, not links) written by run `run_id`, oldest first."""
    return [checkpoint for checkpoint in list_checkpoints(checkpoints_dir)
            if not checkpoint.is_symlink() and _run_id(recorded_lineage(checkpoint)) == run_id]


def remove_abandoned_staging(checkpoints_dir: Path) -> list[Path]:
    """Delete staging folders of processes that no longer run (a crash mid-save); returns them."""
    removed = []
    for staging in checkpoints_dir.glob(f"{STAGING_PREFIX}step-*-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if staging.is_symlink():
            continue
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
            logger.info("removed %s, left by a checkpoint save that never finished (process %s)", staging, pid)
    return removed


def _in_a_world() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def checkpoint_problem(checkpoint: Path, verify_hashes: bool = True) -> str | None:
    """Why `checkpoint` cannot be used (no manifest, unreadable manifest, missing file, hash mismatch), or None.

    A sharded checkpoint looked at from a rank of a distributed world: the shard files are checked by size here
    (no rank reads every shard); their hashes are checked by all ranks together when they load it
    (load_sharded_state). In one process every file is hashed, as for any checkpoint.
    """
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save never finished, or the folder was not written by this trainer)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is not valid JSON"
    sizes = manifest.get("sizes", {}) if manifest.get("format") == SHARDED_FORMAT and _in_a_world() else {}
    for relative, expected in manifest.get("files", {}).items():
        file = checkpoint / relative
        if not file.is_file():
            return f"{relative} is missing"
        if relative.startswith(f"{SHARDED_DIR}/") and relative in sizes:
            if file.stat().st_size != sizes[relative]:
                return f"{relative} has {file.stat().st_size} bytes, {sizes[relative]} in {MANIFEST} (truncated or altered)"
            continue
        if verify_hashes and _sha256(file) != expected:
            return f"{relative} does not match its sha256 in {MANIFEST} (truncated or altered)"
    return None


def is_complete(checkpoint: Path, verify_hashes: bool = True) -> bool:
    problem = checkpoint_problem(checkpoint, verify_hashes)
    if problem:
        logger.warning("checkpoint %s is incomplete or corrupt: %s; ignoring it", checkpoint, problem)
    return problem is None


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
    """The optimizer/scheduler/RNG state of a verified checkpoint; raises CheckpointError otherwise.

    The manifest's hashes are checked first (a torn or altered checkpoint is refused, never resumed from),
    then the file is read with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts
    only, so a tampered file cannot run code while it is unpickled.
    """
    checkpoint = Path(checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise CheckpointError(f"cannot resume from {checkpoint}: {problem}. Resume from an earlier checkpoint "
                              "(train.resume_from: latest picks the newest complete one) or start afresh.")
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {checkpoint / STATE_FILE}: it holds objects other than tensors and plain values, "
            f"which only full pickle could rebuild (and full pickle can run code): {error}") from None
    if is_sharded_checkpoint(checkpoint):  # model and optimizer state are in sharded/: load_sharded_state reads them
        state["sharded_checkpoint"] = str(checkpoint)
    return state
