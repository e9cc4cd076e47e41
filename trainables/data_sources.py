"""Raw rows from a data source (local JSONL/JSON/CSV/Parquet file or hub dataset), typed field access, errors.

JSON lines, JSON arrays and CSV are read by trainables/text_files.py, with limits (a line of at most
32 MiB, at most 1000 fields a row, lists/objects at most 64 levels deep, a .json array of at most 1 GiB)
and an error naming the line for each unreadable one; CSV cells are read as text. Parquet and hub datasets
go through `datasets.load_dataset`. RowReader checks one row's fields and records a RowProblem per fault
(missing, null, wrong type, empty, not valid Unicode, too long); the layouts live in trainables/data.py.
Error messages stay short: at most 10 problems are listed, each bad value shown as an excerpt of at most
80 characters. Tested by `python -m pytest tests/test_data.py tests/test_adversarial_data.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainables.errors import UserError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_FIX = (
    "correct or remove the rows listed above, map your column names with columns={...}, or pass "
    "drop_invalid=True (data.drop_invalid: true) to skip up to max_invalid_fraction of the rows"
)
MAX_LISTED_PROBLEMS = 10  # an error lists this many problems, then counts the rest
MAX_REASON_CHARS = 240  # one problem's reason is cut here
EXCERPT_CHARS = 80  # a bad value is shown as at most this many characters
MAX_FIELD_CHARS = 16 * 2**20  # a text field longer than this is refused (the line limit of text_files.py)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable rendering of a value for an error message: quoted text or JSON, cut with '...'."""
    if isinstance(value, str):
        text = repr(value[: limit + 1])  # repr escapes control characters and lone surrogates
    else:
        try:
            text = json.dumps(value, ensure_ascii=True, default=str)
        except (RecursionError, ValueError, TypeError):
            text = f"<{json_type_name(value)}>"
    return clip(text, limit)


def clip(text: str, limit: int) -> str:
    """Plain text cut to at most `limit` characters, ending with '...' when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_columns(columns: Sequence[str], limit: int = 20) -> str:
    """A list of column names for a message: all of a short list, else the first `limit` and the count."""
    shown = [excerpt(str(name), 40) for name in list(columns)[:limit]]
    more = f", ... ({len(columns)} columns in all)" if len(columns) > limit else ""
    return "[" + ", ".join(shown) + more + "]"


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one row: 0-based row index, the field (file column) and why."""

    row: int
    field: str
    reason: str
    line: int | None = None  # 1-based line number in a JSON-lines or CSV file; None for other formats

    def describe(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        reason = clip(self.reason, MAX_REASON_CHARS)
        name = clip(self.field, 60)
        return f"{where}, field '{name}': {reason}" if self.field else f"{where}: {reason}"

    def kind(self) -> str:
        """Short label for counting, e.g. "empty chosen", "chosen == rejected", "not valid JSON"."""
        head = re.sub(r"\d+", "N", self.reason.split(":")[0])
        field_name = self.field.split("[")[0]
        return head if not field_name or field_name in head else f"{head} {field_name}"


class InvalidDataError(UserError, ValueError):
    """The data cannot be used as it is; the message names the file, the bad rows and how to fix it.

    Every problem is kept in `problems`; the message lists the first MAX_LISTED_PROBLEMS and counts the rest.
    """

    def __init__(self, source: str, problems: Sequence[RowProblem] = (), headline: str = "", fix: str = DEFAULT_FIX):
        self.source, self.problems, self.headline, self.fix = source, list(problems), headline, fix
        lines = [f"invalid data in {source}: {headline or f'{len(self.problems)} problem(s)'}"]
        lines += [f"  {problem.describe()}" for problem in self.problems[:MAX_LISTED_PROBLEMS]]
        rest = self.problems[MAX_LISTED_PROBLEMS:]
        if rest:
            rows = sorted({problem.row for problem in rest})
            shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
            lines.append(f"  ... and {len(rest)} more problem(s) in {len(rows)} row(s): rows {shown}")
        if fix:
            lines.append(f"How to fix: {fix}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep the structured fields when Ray pickles the error back to the driver
        return (type(self), (self.source, self.problems, self.headline, self.fix))


class DataSourceError(UserError, OSError):
    """The source could not be read at all: missing file, unknown format, unreachable hub dataset."""


@dataclass
class RawRows:
    """Rows as plain dicts; rows[i] is None where the reader already found the row unreadable."""

    source: str
    rows: list[dict[str, Any] | None]
    lines: list[int] | None  # 1-based line of each row (JSON lines and CSV)
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


def unicode_problem(text: str) -> str:
    """Why a string is not valid Unicode text ("" when it is): a lone surrogate, as a JSON escape can give."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as error:
        return (f"not valid Unicode: a lone surrogate \\u{ord(text[error.start]):04x} at character {error.start} "
                "(half of a UTF-16 pair, e.g. from a JSON escape); fix or remove that escape")


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
            self.flag(field, f"wrong type: expected {expected_name}, got {json_type_name(value)} ({excerpt(value)})")
            return None
        if isinstance(value, str) and not self.valid_text(field, value):
            return None
        return value

    def valid_text(self, field: str, text: str) -> bool:
        """Flag text that is not valid Unicode or is longer than MAX_FIELD_CHARS."""
        reason = unicode_problem(text)
        if not reason and len(text) > MAX_FIELD_CHARS:
            reason = f"too long: {len(text):,} characters, more than the limit of {MAX_FIELD_CHARS:,}"
        if reason:
            self.flag(field, reason)
        return not reason

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
                else:
                    self.valid_text(where, message[key])
        return value if len(self.problems) == start else None


def non_blank(row: RowReader, field: str, text: str) -> bool:
    if not text.strip():
        row.flag(field, "empty" if not text else "whitespace-only: the text has no visible characters")
        return False
    return True


def read_rows(source: str, *, split: str = "train", data_files_hint: str | None = None) -> RawRows:
    """Read every row of `source` as a dict.

    source: a local .jsonl/.ndjson/.json/.parquet/.csv file, or a hub dataset name (loaded with
    `datasets.load_dataset(name, split=split)`). data_files_hint: for a local file whose extension does
    not say its format, the format ("jsonl", "json", "parquet" or "csv"); for a hub dataset, passed on
    as `data_files=` (a file or pattern inside the dataset repository). `split` only applies to hub data.
    A source none of whose rows can be read is an error listing why (the first lines), not an empty table.
    """
    from trainables import text_files  # it builds on the types above

    path = Path(source).expanduser()
    if path.is_dir():
        raise DataSourceError(f"{source} is a directory; pass one data file (.jsonl, .json, .parquet or .csv)")
    if path.exists() and not path.is_file():
        raise DataSourceError(f"{source} is not a regular file (a device, pipe or socket); pass a data file")
    if path.is_file():
        data_format = FORMAT_BY_SUFFIX.get(path.suffix.lower()) or (data_files_hint or "").lower().lstrip(".")
        readers = {"jsonl": text_files.scan_json_lines, "ndjson": text_files.scan_json_lines,
                   "json": text_files.read_json, "csv": text_files.read_csv}
        if data_format in readers:
            try:
                raw = readers[data_format](path, source)
            except OSError as error:  # permissions, a file removed while read, an I/O error
                raise DataSourceError(f"data file {source} cannot be read: {error.strerror or error}") from None
        elif data_format == "parquet":
            raw = _load_with_datasets(data_format, source, data_files=str(path))
        else:
            raise DataSourceError(
                f"{source}: unknown data format {excerpt(path.suffix, 20)}; use a .jsonl, .json, .parquet or .csv "
                "file, or pass data_files_hint='jsonl'|'json'|'parquet'|'csv'"
            )
    elif path.suffix.lower() in FORMAT_BY_SUFFIX or source.startswith(("/", ".", "~")):
        raise DataSourceError(f"data file {source} does not exist (working directory {os.getcwd()}); check the path")
    else:
        raw = _load_with_datasets(source, source, split=split, data_files=data_files_hint, from_hub=True)
    if not raw.rows:
        raise empty_file_error(source)
    if all(row is None for row in raw.rows):
        raise InvalidDataError(
            source, raw.problems, f"none of the {len(raw.rows)} rows could be read",
            "check that the file is UTF-8 text in the format its name says: JSON lines (one object per line), "
            "a JSON array of objects, or CSV with a header line",
        )
    return raw


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


def empty_file_error(source: str) -> InvalidDataError:
    return InvalidDataError(source, [], "the file is empty (no rows)", "write at least one row; check the export step")


def _load_with_datasets(builder: str, source: str, *, split: str = "train", data_files: str | None = None,
                        from_hub: bool = False) -> RawRows:
    import datasets  # imported here: it is slow to import and only needed for these formats

    try:
        dataset = datasets.load_dataset(builder, data_files=data_files, split=split if from_hub else "train")
    except Exception as error:  # datasets raises many types: ConnectionError, FileNotFoundError, ArrowInvalid, ...
        detail = clip(f"{type(error).__name__}: {error}", 300)
        if from_hub:
            raise DataSourceError(
                f"could not load {source!r} (split {split!r}) as a hub dataset: {detail}. "
                "If it is meant to be a local file, check the path; if a hub dataset, check its name and split, "
                "network access (HF_HUB_OFFLINE) and credentials (HF_TOKEN)."
            ) from error
        raise InvalidDataError(
            source, [], f"could not be read as {builder}: {detail}",
            f"check that the file is a valid {builder} file with one row per record",
        ) from error
    return RawRows(source, dataset.to_list(), None, [])


def json_type_name(value: Any) -> str:
    """JSON-flavoured type names for error messages: string, number, object, list, boolean."""
    names = {str: "string", bool: "boolean", int: "number", float: "number", dict: "object", list: "list",
             type(None): "null", bytes: "binary data"}
    return names.get(type(value), f"a {type(value).__name__} value")
