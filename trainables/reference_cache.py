"""Reference-model log-probs computed once, cached on disk under a fingerprint, shared by every trial.

In `reference.mode: precomputed` the reference model runs once over the train and eval pairs; its
per-sequence log-probs (for the DPO rewards) and per-token answer log-probs (for the KL term) are written
as safetensors (never pickle) to `<cache_dir>/reference-<fingerprint>.safetensors`. The fingerprint
(ReferenceKeyInputs, reference_fingerprint) covers the reference model's weights and class, its weight
dtype, the autocast dtype it runs under, the attention kernel, every token id and length of the data (so
the data, the tokenizer, max_length and the truncation), the truncation rule's version and the version of
this computation, so any changed input gives a new file. The driver computes it once
(trainables/entrypoints.reference_cache_key) and hands it to every trial and rank: no worker re-hashes
the weights. Training then loads a single model. A cache file that cannot be read or does not hold exactly
these pairs' values (truncated, another header, other shapes or token counts, non-finite values) is
recomputed with a warning naming the file; so is one whose values do not match the sha256 its header holds
(altered after it was written). Processes that need to (re)compute the same file take turns on a lock file
beside it, and the ones that waited read the file the first one wrote: a cache damaged while a sweep's
trials run is recomputed once, not once per trial. Tested by `python -m pytest tests/test_chaos_cache.py tests/test_engine.py
tests/test_adversarial_model.py -q`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainables.errors import UserError
from trainables.logprobs import forward_logps, scatter_answer_values, split_chosen_rejected
from trainables.tokenization import TRUNCATION_RULE, TokenizedPair, collate_pairs

logger = logging.getLogger(__name__)

CONTENT_HASH_KEY = "content_sha256"  # header metadata: sha256 of the values (content_sha256)


@dataclass
class ReferenceLogps:
    """Cached reference log-probs for N pairs; token values are stored flat with offsets."""

    chosen_logps: torch.Tensor  # (N,)
    rejected_logps: torch.Tensor  # (N,)
    chosen_token_logps: torch.Tensor  # (total chosen answer tokens,)
    rejected_token_logps: torch.Tensor  # (total rejected answer tokens,)
    chosen_offsets: torch.Tensor  # (N+1,) long
    rejected_offsets: torch.Tensor  # (N+1,) long

    def __len__(self) -> int:
        return self.chosen_logps.shape[0]

    def for_batch(self, indices: Sequence[int], answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference values for a collated batch of the pairs `indices`.

        Returns chosen (B,), rejected (B,) sequence log-probs and token log-probs (2B, seq) aligned with
        answer_mask, all on answer_mask's device.
        """
        index = torch.as_tensor(list(indices), dtype=torch.long)
        rows = [
            self.chosen_token_logps[self.chosen_offsets[i] : self.chosen_offsets[i + 1]] for i in index.tolist()
        ] + [
            self.rejected_token_logps[self.rejected_offsets[i] : self.rejected_offsets[i + 1]] for i in index.tolist()
        ]
        device = answer_mask.device
        return (
            self.chosen_logps[index].to(device),
            self.rejected_logps[index].to(device),
            scatter_answer_values(answer_mask, rows),  # (2B, seq)
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in self.__dataclass_fields__}


# Bump when compute_reference_logps changes the numbers it writes (the head, the batching, the reduction):
# every cache written before then gets a new key and is recomputed.
REFERENCE_COMPUTATION_VERSION = "2"


@dataclass(frozen=True)
class ReferenceKeyInputs:
    """Everything about the reference model and how it runs that changes its log-probs (the pairs' token
    ids and lengths, so the data, tokenizer, max_length and truncation, are hashed from the pairs)."""

    weights: str  # modeling.model_fingerprint: the content hash of config.json and the safetensors (or hub@revision)
    model_class: str  # config.json's architectures, e.g. LlamaForCausalLM
    weight_dtype: str  # model.dtype the reference is loaded in
    compute_dtype: str  # the autocast dtype it runs under (float32: none)
    attn_implementation: str  # the kernel actually used (flash_attention_2 falls back to sdpa when missing)
    truncation_rule: str = TRUNCATION_RULE
    version: str = REFERENCE_COMPUTATION_VERSION

    def describe(self) -> str:
        return "|".join(f"{name}={getattr(self, name)}" for name in self.__dataclass_fields__)


def reference_fingerprint(inputs: ReferenceKeyInputs, pairs: Sequence[TokenizedPair]) -> str:
    """Hash of everything the cached values depend on: `inputs` and every pair's token ids and lengths."""
    digest = hashlib.sha256()
    digest.update(f"{inputs.describe()}|{len(pairs)}".encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> ReferenceLogps:
    """One no-grad pass of the reference model over all pairs, batched by similar length."""
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids))
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    chosen_tokens: list[torch.Tensor | None] = [None] * len(pairs)
    rejected_tokens: list[torch.Tensor | None] = [None] * len(pairs)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for indices in tqdm(batches, desc="reference log-probs", disable=not show_progress):
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in indices], pad_token_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            result = forward_logps(model, batch)
        chosen_seq, rejected_seq = split_chosen_rejected(result.sequence_logps.float().cpu())
        chosen_mask, rejected_mask = split_chosen_rejected(batch["answer_mask"].cpu())
        chosen_tok, rejected_tok = split_chosen_rejected(result.token_logps.float().cpu())
        for row, pair_index in enumerate(indices):
            chosen[pair_index] = chosen_seq[row]
            rejected[pair_index] = rejected_seq[row]
            chosen_tokens[pair_index] = chosen_tok[row][chosen_mask[row]]
            rejected_tokens[pair_index] = rejected_tok[row][rejected_mask[row]]
    return ReferenceLogps(
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_token_logps=torch.cat(chosen_tokens) if pairs else torch.zeros(0),
        rejected_token_logps=torch.cat(rejected_tokens) if pairs else torch.zeros(0),
        chosen_offsets=_offsets([t.numel() for t in chosen_tokens]),
        rejected_offsets=_offsets([t.numel() for t in rejected_tokens]),
    )


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.long).cumsum(0)


def cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"reference-{fingerprint}.safetensors"


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order): any altered value changes it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_reference_logps(values: ReferenceLogps, path: Path, metadata: dict[str, str]) -> None:
    """Atomic write: a crash leaves either no file or a complete one. The header holds the content's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    tensors = values.tensors()
    save_file(tensors, str(temporary), metadata={**{k: str(v) for k, v in metadata.items()},
                                                 CONTENT_HASH_KEY: content_sha256(tensors)})
    os.replace(temporary, path)


def load_reference_logps(path: Path) -> ReferenceLogps:
    return ReferenceLogps(**load_file(str(path)))


class UnusableCache(ValueError):
    """A cache file that does not hold the values of the pairs it is looked up for."""


def read_cache(path: Path, fingerprint: str, pairs: Sequence[TokenizedPair]) -> ReferenceLogps:
    """The values in `path` if they are exactly those of `pairs` under `fingerprint`; else UnusableCache."""
    try:
        data = path.read_bytes()  # read, not mapped: a file replaced later cannot pull values from under training
        tensors = load_safetensors(data)
        metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as error:  # noqa: BLE001 - any damage to the file (truncated, not safetensors) means recompute
        raise UnusableCache(f"it cannot be read as safetensors ({' '.join(str(error).split())[:120]})") from error
    if metadata.get("fingerprint") != fingerprint:
        raise UnusableCache(f"its header names fingerprint {str(metadata.get('fingerprint'))[:40]!r}, not {fingerprint!r}")
    if metadata.get(CONTENT_HASH_KEY) != content_sha256(tensors):  # a file of an older version has none: recomputed
        raise UnusableCache("its values do not match the sha256 in its header (altered after it was written)")
    return read_values(ReferenceLogps(**_named(tensors)), pairs)


def _named(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = set(ReferenceLogps.__dataclass_fields__)
    if set(tensors) != names:
        raise UnusableCache(f"it holds tensors {sorted(tensors)[:8]}, expected {sorted(names)}")
    return tensors


def read_values(values: ReferenceLogps, pairs: Sequence[TokenizedPair]) -> ReferenceLogps:
    """`values` if they have the shapes, types and answer token counts of `pairs` and are finite; else UnusableCache."""
    tensors = values.tensors()
    count = len(pairs)
    for side, lengths in (("chosen", [len(p.chosen_ids) for p in pairs]), ("rejected", [len(p.rejected_ids) for p in pairs])):
        sequence, tokens, offsets = (tensors[f"{side}_logps"], tensors[f"{side}_token_logps"], tensors[f"{side}_offsets"])
        if any(t.dim() != 1 for t in (sequence, tokens, offsets)) or sequence.shape[0] != count:
            raise UnusableCache(f"its {side} tensors do not have the shapes of {count} pairs")
        if not (sequence.is_floating_point() and tokens.is_floating_point()) or offsets.dtype != torch.long:
            raise UnusableCache(f"its {side} tensors have the wrong types")
        if not torch.equal(offsets, _offsets(lengths)):
            raise UnusableCache(f"its {side} answer token counts are not those of these pairs")
        if not (torch.isfinite(sequence).all() and torch.isfinite(tokens).all()):
            raise UnusableCache(f"its {side} log-probs are not all finite")
    return values


def load_or_compute_reference_logps(
    *,
    cache_dir: Path,
    fingerprint: str,
    pairs: Sequence[TokenizedPair],
    load_reference_model: Callable[[], torch.nn.Module],
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    show_progress: bool = True,
    compute_values: Callable[[], ReferenceLogps] | None = None,
) -> tuple[ReferenceLogps, bool]:
    """Reuse the cache file for `fingerprint` or compute and write it. Returns (values, reused).

    compute_values: computes every pair's values some other way (the sweep's data-parallel reference pass,
    orchestrator/ray/reference_task.py) instead of loading the model here; called under the same lock."""
    path = cache_path(cache_dir, fingerprint)
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"reference.cache_dir: {cache_dir} is a file, not a folder; set reference.cache_dir to a folder")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise UserError(f"reference.cache_dir: {path} is not a file (a folder?) where the reference log-probs go; "
                        "move it away or set reference.cache_dir to another folder")
    values = _reuse(path, fingerprint, pairs, warn=True)
    if values is not None:
        return values, True
    # One process (re)computes while the others that need the same file wait for it and then read it: trials
    # that find the cache damaged together recompute it once, not once each.
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".lock")):
        values = _reuse(path, fingerprint, pairs, warn=False)  # written (again) while this process waited
        if values is not None:
            return values, True
        logger.info("computing reference log-probs for %d pairs into %s", len(pairs), path)
        if compute_values is not None:
            values = compute_values()
            read_values(values, pairs)  # the parts together are exactly these pairs' values
        else:
            model = load_reference_model().to(device)
            values = compute_reference_logps(
                model, pairs, pad_token_id=pad_token_id, batch_size=batch_size, device=device,
                autocast_dtype=autocast_dtype, show_progress=show_progress,
            )
            del model
        save_reference_logps(values, path, {"fingerprint": fingerprint, "pairs": json.dumps(len(pairs))})
    return values, False


# ---- the data-parallel pass: each worker writes the part of one contiguous slice of the pairs ------------

def slice_bounds(total: int, count: int) -> list[tuple[int, int]]:
    """[start, stop) of `count` contiguous slices of `total` pairs, sizes differing by at most one."""
    edges = [total * index // count for index in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def part_path(cache_dir: Path, fingerprint: str, index: int, count: int) -> Path:
    return Path(cache_dir) / f"reference-{fingerprint}.part-{index + 1}-of-{count}.safetensors"


def load_or_compute_part(cache_dir: Path, fingerprint: str, pairs: Sequence[TokenizedPair], index: int, count: int,
                         compute: Callable[[Sequence[TokenizedPair]], ReferenceLogps]) -> tuple[ReferenceLogps, bool]:
    """The values of slice `index` of `count` of `pairs` (all of them), from its part file if a finished one is
    there (a pass stopped half-way resumes with the parts it wrote) or computed by `compute(slice)` and written.
    Returns (values, reused)."""
    start, stop = slice_bounds(len(pairs), count)[index]
    mine, path = pairs[start:stop], part_path(cache_dir, fingerprint, index, count)
    key = f"{fingerprint}:{index + 1}/{count}"
    values = _reuse(path, key, mine, warn=True)
    if values is not None:
        return values, True
    values = compute(mine)
    save_reference_logps(values, path, {"fingerprint": key, "pairs": json.dumps(len(mine))})
    return values, False


def concat_reference_logps(parts: Sequence[ReferenceLogps]) -> ReferenceLogps:
    """The values of consecutive slices as one cache (offsets shifted by the tokens before each part)."""
    def offsets(side: str) -> torch.Tensor:
        pieces, base = [torch.zeros(1, dtype=torch.long)], 0
        for part in parts:
            shifted = getattr(part, f"{side}_offsets")[1:] + base
            pieces.append(shifted)
            base += int(getattr(part, f"{side}_offsets")[-1])
        return torch.cat(pieces)

    return ReferenceLogps(
        chosen_logps=torch.cat([part.chosen_logps for part in parts]),
        rejected_logps=torch.cat([part.rejected_logps for part in parts]),
        chosen_token_logps=torch.cat([part.chosen_token_logps for part in parts]),
        rejected_token_logps=torch.cat([part.rejected_token_logps for part in parts]),
        chosen_offsets=offsets("chosen"),
        rejected_offsets=offsets("rejected"),
    )


def remove_parts(cache_dir: Path, fingerprint: str) -> None:
    """Delete the part files of `fingerprint` once the whole cache file is written."""
    for path in Path(cache_dir).glob(f"reference-{fingerprint}.part-*-of-*.safetensors"):
        path.unlink(missing_ok=True)


def _reuse(path: Path, fingerprint: str, pairs: Sequence[TokenizedPair], *, warn: bool) -> ReferenceLogps | None:
    if not path.exists():
        return None
    try:
        values = read_cache(path, fingerprint, pairs)
    except UnusableCache as problem:
        if warn:
            logger.warning("reference cache %s is unusable (%s); recomputing it", path, problem)
        return None
    logger.info("reusing reference log-probs %s", path)
    return values


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive flock on lock_path (created, never followed through a link) for the block; blocks until free."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock
