"""The token store: a sweep's tokenised pairs written once as Arrow files that every process memory-maps.

A sweep's driver validates and tokenises the data once (trainables/entrypoints.load_preference_data) and
writes the pairs to `<sweep root>/data/tokens-<key>/` (orchestrator/config/layout.py: token_stores):

    train.arrow, eval.arrow   Arrow IPC files, columns prompt_ids / chosen_ids / rejected_ids (large_list<int32>)
    manifest.json             format, key, and per split its rows and bytes and the files' sha256; written last

Trials and the reference task then open the files memory-mapped (`StoredPairs`): the pages are the OS's
page cache, shared by every process of a node, instead of one unpickled copy per process from Ray's
object store. `StoredPairs` is a read-only sequence of TokenizedPair built on access, so the engine
(bucketing, collation, the reference cache's fingerprint) sees the same pairs as from a list; it pickles
as its path, so what Ray ships to a trial is the tokenizer and two paths.

The key (`input_key`) covers what the pairs depend on: each data file's bytes, the tokenizer
(lineage.tokenizer_identity), the data.* keys that change the rows (layout, columns, max_length,
max_prompt_length, drop_invalid, max_invalid_fraction, eval_holdout), the truncation rule and this
format's version. A resumed sweep finds its store by that key and skips validation and tokenisation; a
changed file, tokenizer or max_length gives a new folder. A hub dataset has no bytes to hash up front:
its store is keyed by the tokenised pairs (`content_key`), so it is written again only when they differ.
A store is written into a temporary folder and renamed into place, and checked before reuse (manifest,
sizes, row counts and, in the driver, the sha256 of each file): a crashed or damaged store is rewritten,
never read half. Tested by `python -m pytest tests/test_token_store.py -q`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from trainables.errors import UserError
from trainables.lineage import rows_fingerprint, tokenizer_identity
from trainables.tokenization import TRUNCATION_RULE, TokenizedPair

logger = logging.getLogger(__name__)

STORE_FORMAT = "token-store-v1"  # bump when the files, or how rows are validated and tokenised, change
MANIFEST = "manifest.json"
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
SPLITS = ("train", "eval")
BATCH_ROWS = 65_536  # rows per Arrow record batch: bounds the writer's memory, not the reader's


class TokenStoreError(UserError, OSError):
    """The sweep's token store could not be written (a full disk, a read-only storage_path)."""


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _settings(data_args, tokenizer, tokenizer_path: str) -> dict:
    """What besides the data's content changes the stored pairs."""
    import tokenizers

    return {"format": STORE_FORMAT, "truncation": TRUNCATION_RULE, "tokenizers": tokenizers.__version__,
            "tokenizer": tokenizer_identity(tokenizer, tokenizer_path)["fingerprint"],
            "layout": data_args.layout, "columns": list(data_args.columns), "max_length": data_args.max_length,
            "max_prompt_length": data_args.max_prompt_length, "drop_invalid": data_args.drop_invalid,
            "max_invalid_fraction": data_args.max_invalid_fraction, "eval_holdout": data_args.eval_holdout}


def input_key(data_args, tokenizer, tokenizer_path: str) -> str | None:
    """The store's key from its inputs (every data file's sha256 and the settings), known before tokenising;
    None when a source is not a local file (a hub dataset: see content_key)."""
    from trainables.data_sources import dataset_fingerprint

    sources = [(data_args.train, data_args.train_split)]
    if data_args.eval:
        sources.append((data_args.eval, data_args.eval_split))
    if not all(Path(source).expanduser().is_file() for source, _ in sources):
        return None
    files = [dataset_fingerprint(source, split) for source, split in sources]
    return _digest({"files": files, **_settings(data_args, tokenizer, tokenizer_path)})


def content_key(data_args, tokenizer, tokenizer_path: str, train: Sequence[TokenizedPair],
                held_out: Sequence[TokenizedPair]) -> str:
    """The store's key from the tokenised pairs themselves (for sources without a file to hash)."""
    rows = {"train": rows_fingerprint(train), "eval": rows_fingerprint(held_out)}
    return _digest({"rows": rows, **_settings(data_args, tokenizer, tokenizer_path)})


def store_dir(parent: str | os.PathLike, key: str) -> Path:
    return Path(parent) / f"tokens-{key}"


def _column_batch(pairs: Sequence[TokenizedPair], name: str):
    """One column of a record batch as large_list<int32> (pyarrow converts the tuples in C++)."""
    import pyarrow as pa

    try:
        return pa.array([getattr(pair, name) for pair in pairs], type=pa.large_list(pa.int32()))
    except (pa.ArrowInvalid, OverflowError) as error:
        raise ValueError(f"token store: a {name} token id does not fit in 32 bits: {error}") from error


def _write_split(path: Path, pairs: Sequence[TokenizedPair]) -> int:
    import pyarrow as pa

    schema = pa.schema([(name, pa.large_list(pa.int32())) for name in COLUMNS])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(pairs), BATCH_ROWS):
            batch = pairs[start : start + BATCH_ROWS]
            writer.write_batch(pa.record_batch([_column_batch(batch, name) for name in COLUMNS], schema=schema))
    return len(pairs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_token_store(directory: str | os.PathLike, splits: dict[str, Sequence[TokenizedPair]], key: str) -> Path:
    """Write the pairs of each split (train, eval) to `directory`, atomically: a temporary folder beside it,
    the manifest last, then one rename. A damaged store already there is replaced; a valid one (another
    driver's, same key) is kept."""
    directory = Path(directory)
    try:
        return _write(directory, splits, key)
    except OSError as error:
        raise TokenStoreError(f"token store {directory}: could not write it ({type(error).__name__}: {error}); free "
                              "space there or set storage_path to a writable folder") from error


def _write(directory: Path, splits: dict[str, Sequence[TokenizedPair]], key: str) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        manifest = {"format": STORE_FORMAT, "key": key, "splits": {}}
        for name, pairs in splits.items():
            path = temp / f"{name}.arrow"
            rows = _write_split(path, pairs)
            manifest["splits"][name] = {"rows": rows, "bytes": path.stat().st_size, "sha256": _sha256(path)}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            if check_token_store(directory, verify_content=True) is not None:
                return directory  # written meanwhile by another process: same key, same pairs
            logger.warning("token store %s is damaged or incomplete: replacing it", directory)
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(temp, directory)
        except OSError:  # another process renamed its complete store into place first
            if check_token_store(directory) is None:
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logger.info("token store written: %s (%s)", directory,
                ", ".join(f"{len(pairs)} {name} pairs" for name, pairs in splits.items()))
    return directory


def check_token_store(directory: str | os.PathLike, *, verify_content: bool = False) -> dict | None:
    """The store's manifest when it is complete (every split's file of the recorded size and rows, and with
    verify_content its recorded sha256); None when it is missing, partial or damaged."""
    import pyarrow as pa

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != STORE_FORMAT or set(manifest["splits"]) != set(SPLITS):
            return None
        for name, recorded in manifest["splits"].items():
            path = directory / f"{name}.arrow"
            if path.stat().st_size != recorded["bytes"]:
                return None
            if verify_content and _sha256(path) != recorded["sha256"]:
                return None
            with pa.memory_map(str(path), "r") as source:
                if pa.ipc.open_file(source).read_all().num_rows != recorded["rows"]:
                    return None
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    return manifest


class StoredPairs(Sequence[TokenizedPair]):
    """A split of a token store, memory-mapped: pairs[i] builds the TokenizedPair of row i from the mapped
    columns; iteration converts one record batch at a time. Pickles as its path (reopened, mapped, there)."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow as pa

        self.path = str(path)
        self._source = pa.memory_map(self.path, "r")  # kept open for the life of the views below
        table = pa.ipc.open_file(self._source).read_all()  # zero-copy: the buffers point into the mapping
        self._batches = []  # per record batch: ((offsets, values) per column) as numpy views of the mapping
        for batch in table.to_batches():
            self._batches.append(tuple((batch.column(name).offsets.to_numpy(), batch.column(name).values.to_numpy())
                                       for name in COLUMNS))
        self._starts = np.cumsum([0] + [batch.num_rows for batch in table.to_batches()]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)} in {self.path}")
        batch = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[batch]
        return TokenizedPair(*(tuple(values[offsets[row] : offsets[row + 1]].tolist())
                               for offsets, values in self._batches[batch]))

    def __iter__(self) -> Iterator[TokenizedPair]:
        for columns in self._batches:
            as_lists = [(offsets.tolist(), values.tolist()) for offsets, values in columns]
            for row in range(len(as_lists[0][0]) - 1):
                yield TokenizedPair(*(tuple(values[offsets[row] : offsets[row + 1]]) for offsets, values in as_lists))

    def __reduce__(self):
        return (StoredPairs, (self.path,))

    def __repr__(self) -> str:
        return f"StoredPairs({self.path!r}, {len(self)} pairs)"


def open_token_store(directory: str | os.PathLike) -> dict[str, StoredPairs]:
    """Each split of a complete store, memory-mapped (check_token_store first: this one trusts the files)."""
    return {name: StoredPairs(Path(directory) / f"{name}.arrow") for name in SPLITS}
