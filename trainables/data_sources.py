"""Raw rows from a data source (local JSONL/JSON/Parquet/CSV file or hub dataset), typed field access, errors.

JSON-family files are read line by line by this module itself instead of the `datasets` JSON reader,
which names no line when a file holds bad bytes or broken JSON, turns a missing field into null, and
refuses columns whose type changes between rows; every unreadable line is collected, not just the
first. Parquet, CSV and hub datasets go through `datasets.load_dataset`. RowReader checks one row's
fields and records a RowProblem per fault; the layouts themselves live in trainables/data.py.
Tested by `python -m pytest tests/test_data.py -q`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainables.errors import UserError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_FIX = (
    "correct or remove the rows listed above, map your column names with columns={...}, or pass "
    "drop_invalid=True (data.drop_invalid: true) to skip up to max_invalid_fraction of the rows"
)


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one row: 0-based row index, the field (file column) and why."""

    row: int
    field: str
    reason: str
    line: int | None = None  # 1-based line number in a JSON-lines file; None for other formats

    def describe(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where}, field '{self.field}': {self.reason}" if self.field else f"{where}: {self.reason}"

    def kind(self) -> str:
        """Short label for counting, e.g. "empty chosen", "chosen == rejected", "not valid JSON"."""
        head = self.reason.split(":")[0]
        field_name = self.field.split("[")[0]
        return head if not field_name or field_name in head else f"{head} {field_name}"


class InvalidDataError(UserError, ValueError):
    """The data cannot be used as it is; the message names the file, every bad row and how to fix it."""

    def __init__(self, source: str, problems: Sequence[RowProblem] = (), headline: str = "", fix: str = DEFAULT_FIX):
        self.source, self.problems, self.headline, self.fix = source, list(problems), headline, fix
        lines = [f"invalid data in {source}: {headline or f'{len(self.problems)} problem(s)'}"]
        lines += [f"  {problem.describe()}" for problem in self.problems]
        if fix:
            lines.append(f"How to fix: {fix}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep the structured fields when Ray pickles the error back to the driver
        return (type(self), (self.source, self.problems, self.headline, self.fix))


class DataSourceError(UserError, OSError):
    """The source could not be read at all: missing file, unknown format, unreachable hub dataset."""


@dataclass
class RawRows:
    """Rows as plain dicts; rows[i] is None where the pre-scan already found the row unreadable."""

    source: str
    rows: list[dict[str, Any] | None]
    lines: list[int] | None  # 1-based line of each row (JSON lines only)
    problems: list[RowProblem] = field(default_factory=list)
    is_csv: bool = False

    def columns(self) -> list[str]:
        """Every key seen in any row, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            if row is not None:
                seen.update(dict.fromkeys(row))
        return list(seen)

    def line_of(self, index: int) -> int | None:
        return self.lines[index] if self.lines is not None else None


class RowReader:
    """Typed access to one row's fields that records a RowProblem for each thing wrong."""

    def __init__(self, values: dict[str, Any], index: int, line: int | None, mapping: dict[str, str], is_csv: bool):
        self.values, self.index, self.line, self.mapping, self.is_csv = values, index, line, mapping, is_csv
        self.problems: list[RowProblem] = []

    def flag(self, field: str, reason: str) -> None:
        self.problems.append(RowProblem(self.index, self.mapping.get(field, field), reason, self.line))

    def value(self, field: str, expected: type, expected_name: str) -> Any:
        column = self.mapping[field]
        if column not in self.values:
            self.flag(field, f"missing: the row has no '{column}' field")
            return None
        value = self.values[column]
        if value is None:
            detail = " (an empty CSV cell)" if self.is_csv else f": '{column}' must be {expected_name}"
            self.flag(field, "null" + detail)
            return None
        if not isinstance(value, expected):
            self.flag(field, f"wrong type: expected {expected_name}, got {json_type_name(value)} ({_short(value)})")
            return None
        return value

    def text(self, field: str) -> str | None:
        """A non-empty string field."""
        value = self.value(field, str, "a string")
        return value if value is not None and non_blank(self, field, value) else None

    def messages(self, field: str) -> list[dict[str, str]] | None:
        """A non-empty list of {role, content} messages."""
        value = self.value(field, list, "a list of {role, content} messages")
        if value is None:
            return None
        if not value:
            self.flag(field, "empty: the list has no messages")
            return None
        column, start = self.mapping.get(field, field), len(self.problems)
        for position, message in enumerate(value):
            where = f"{column}[{position}]"
            if not isinstance(message, dict):
                reason = f"wrong type: a message must be an object with role and content, got {json_type_name(message)}"
                self.problems.append(RowProblem(self.index, where, reason, self.line))
                continue
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    got = "" if message.get(key) is None else f": expected a string, got {json_type_name(message[key])}"
                    self.problems.append(RowProblem(self.index, where, f"message without '{key}'{got}", self.line))
        return value if len(self.problems) == start else None


def non_blank(row: RowReader, field: str, text: str) -> bool:
    if not text.strip():
        row.flag(field, "empty" if not text else "whitespace-only: the text has no visible characters")
        return False
    return True


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_rows(source: str, *, split: str = "train", data_files_hint: str | None = None) -> RawRows:
    """Read every row of `source` as a dict.

    source: a local .jsonl/.ndjson/.json/.parquet/.csv file, or a hub dataset name (loaded with
    `datasets.load_dataset(name, split=split)`). data_files_hint: for a local file whose extension does
    not say its format, the format ("jsonl", "json", "parquet" or "csv"); for a hub dataset, passed on
    as `data_files=` (a file or pattern inside the dataset repository). `split` only applies to hub data.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataSourceError(f"{source} is a directory; pass one data file (.jsonl, .json, .parquet or .csv)")
    if path.is_file():
        data_format = FORMAT_BY_SUFFIX.get(path.suffix.lower()) or (data_files_hint or "").lower().lstrip(".")
        if data_format in ("jsonl", "ndjson"):
            return _scan_json_lines(path, source)
        if data_format == "json":
            return _read_json(path, source)
        if data_format in ("parquet", "csv"):
            return _load_with_datasets(data_format, source, data_files=str(path))
        raise DataSourceError(
            f"{source}: unknown data format {path.suffix!r}; use a .jsonl, .json, .parquet or .csv file, or "
            "pass data_files_hint='jsonl'|'json'|'parquet'|'csv'"
        )
    if path.suffix.lower() in FORMAT_BY_SUFFIX or source.startswith(("/", ".", "~")):
        raise DataSourceError(f"data file {source} does not exist (working directory {os.getcwd()}); check the path")
    return _load_with_datasets(source, source, split=split, data_files=data_files_hint, from_hub=True)


def dataset_fingerprint(source: str, split: str = "train") -> str:
    """sha256 of a local file's bytes; for a hub dataset, sha256 of its name and split."""
    path = Path(source).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(f"hub:{source}:{split}".encode())
    return digest.hexdigest()


def _empty_file_error(source: str) -> InvalidDataError:
    return InvalidDataError(source, [], "the file is empty (no rows)", "write at least one row; check the export step")


def _scan_json_lines(path: Path, source: str) -> RawRows:
    """Parse a JSON-lines file line by line, collecting every unreadable line instead of stopping."""
    rows: list[dict[str, Any] | None] = []
    lines: list[int] = []
    problems: list[RowProblem] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue  # blank lines are allowed and skipped
            row_index = len(rows)
            lines.append(line_number)
            value, reason = _parse_json_line(raw)
            rows.append(value)
            if reason:
                problems.append(RowProblem(row_index, "", reason, line_number))
    if not rows:
        raise _empty_file_error(source)
    return RawRows(source, rows, lines, problems)


def _parse_json_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(object, "") for a good line, (None, reason) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, (
            f"not UTF-8: byte {raw[error.start]:#04x} at byte {error.start} of the line; "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON: {error.msg} at column {error.colno}; each line must be one complete JSON object"
    if not isinstance(value, dict):
        got = json_type_name(value)
        return None, f"not a JSON object: got {got}; each line must be an object like {{\"prompt\": ...}}"
    return value, ""


def _read_json(path: Path, source: str) -> RawRows:
    """A .json file: a top-level array of objects, or JSON lines under a .json name."""
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if not head:
        raise _empty_file_error(source)
    if not head.startswith(b"["):
        rows = _scan_json_lines(path, source)
        if rows.problems and all(row is None for row in rows.rows) and _parses_as_one_object(path):
            raise InvalidDataError(
                source, [], "the file holds a single JSON object, not a list of rows",
                "write one object per line (JSON lines, .jsonl) or a top-level JSON array of row objects",
            )
        return rows
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InvalidDataError(
            source, [], f"not UTF-8 at line {line} (byte {error.start})", "re-save the file as UTF-8"
        ) from None
    except json.JSONDecodeError as error:
        raise InvalidDataError(
            source, [], f"not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            "fix the JSON syntax there (a JSON-lines file should be named .jsonl)",
        ) from None
    problems = [
        RowProblem(index, "", f"not a JSON object: got {json_type_name(value)}; every array element must be a row")
        for index, value in enumerate(document)
        if not isinstance(value, dict)
    ]
    if not document:
        raise _empty_file_error(source)
    rows = [value if isinstance(value, dict) else None for value in document]
    return RawRows(source, rows, None, problems)


def _parses_as_one_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_bytes().decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _load_with_datasets(builder: str, source: str, *, split: str = "train", data_files: str | None = None,
                        from_hub: bool = False) -> RawRows:
    import datasets  # imported here: it is slow to import and only needed for these formats

    try:
        dataset = datasets.load_dataset(builder, data_files=data_files, split=split if from_hub else "train")
    except Exception as error:  # datasets raises many types: ConnectionError, FileNotFoundError, ArrowInvalid, ...
        if from_hub:
            raise DataSourceError(
                f"could not load {source!r} (split {split!r}) as a hub dataset: {type(error).__name__}: {error}. "
                "If it is meant to be a local file, check the path; if a hub dataset, check its name and split, "
                "network access (HF_HUB_OFFLINE) and credentials (HF_TOKEN)."
            ) from error
        raise InvalidDataError(
            source, [], f"could not be read as {builder}: {type(error).__name__}: {error}",
            f"check that the file is a valid {builder} file with one row per record",
        ) from error
    rows = dataset.to_list()
    if not rows:
        raise _empty_file_error(source)
    return RawRows(source, rows, None, [], is_csv=builder == "csv")


def json_type_name(value: Any) -> str:
    """JSON-flavoured type names for error messages: string, number, object, list, boolean."""
    names = {str: "string", bool: "boolean", int: "number", float: "number", dict: "object", list: "list",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)
