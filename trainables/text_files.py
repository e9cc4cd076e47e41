"""Bounded readers of local text data files: JSON lines, JSON arrays and CSV, each problem named by its line.

Limits (a hostile or broken file costs bounded memory and time, and gets one clear error):
- the file must be UTF-8 text: a UTF-16/UTF-32 byte-order mark, NUL bytes, or a gzip/zip/Parquet signature
  in its first 64 KiB refuses it at once, naming the line; a later line that is not UTF-8 is a bad row;
- a line (a row) holds at most MAX_LINE_BYTES = 32 MiB; a longer line is a bad row, skipped without being
  read into memory;
- a row has at most MAX_FIELDS = 1000 fields, its lists/objects nest at most MAX_NESTING = 64 levels, and
  no object in it names a field twice (JSON would keep the last value silently);
- a .json array file is parsed whole, so it may hold at most MAX_JSON_DOCUMENT_BYTES = 1 GiB (JSON lines
  are read a line at a time and have no such limit).
JSON-lines problems are collected per line (every bad line is reported, or dropped with data.drop_invalid);
a CSV file is read with Python's csv module, every cell as text (an answer "42" stays the text "42", an
empty cell is null), and a line it cannot parse stops the read with an error naming that line.
Used by trainables/data_sources.py `read_rows`; tested by `python -m pytest tests/test_adversarial_data.py -q`.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from trainables.data_sources import (
    InvalidDataError,
    RawRows,
    RowProblem,
    clip,
    empty_file_error,
    excerpt,
    json_type_name,
)

MAX_LINE_BYTES = 32 * 2**20
MAX_FIELDS = 1000
MAX_NESTING = 64
MAX_JSON_DOCUMENT_BYTES = 2**30
SNIFF_BYTES = 1 << 16
NOT_UTF8_FIX = ("re-save the file as UTF-8 text (e.g. `iconv -f UTF-16 -t UTF-8 FILE > FILE.utf8`, or `-f latin1` "
                "for Latin-1), or point data.train / data.eval at the right file")
SIGNATURES = ((b"\x1f\x8b", "gzip-compressed data; decompress it first"),
              (b"PK\x03\x04", "a zip archive; extract the data file first"),
              (b"PAR1", "a Parquet file; give it a .parquet name"))


def _line_at(data: bytes, position: int) -> int:
    return data.count(b"\n", 0, position) + 1


def _is_utf8_start(head: bytes) -> bool:
    """Whether the bytes are the start of UTF-8 text (a character cut at the end is allowed)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return True
    except UnicodeDecodeError:
        return False


def refuse_non_text_file(path: Path, source: str) -> None:
    """Refuse a file that is plainly not UTF-8 text (another encoding, binary, compressed), naming the line.

    A Latin-1 or other 8-bit file without NUL bytes passes here; its lines are refused one by one, by line.
    """
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    verdict = ""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(bom):
            verdict = f"it is {name} text (line 1 starts with a {name} byte-order mark)"
            break
    binary = not verdict and (b"\x00" in head or not _is_utf8_start(head))
    for signature, what in SIGNATURES if binary else ():
        if head.startswith(signature):
            verdict = f"line 1 starts with the signature of {what}"
            break
    if binary and not verdict and b"\x00" in head:
        first = head.index(b"\x00")
        utf16 = head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4
        what = "UTF-16 text without a byte-order mark" if utf16 else "binary data"
        verdict = f"it looks like {what} (NUL bytes from line {_line_at(head, first)}, byte {first})"
    if verdict:
        raise InvalidDataError(source, [], f"the file is not UTF-8 text: {verdict}", NOT_UTF8_FIX)


def bounded_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes) per line; None instead of the bytes for a line over MAX_LINE_BYTES,
    which is skipped without being held in memory."""
    limit, number = MAX_LINE_BYTES, 0
    while raw := handle.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        else:
            yield number, raw


def too_long_reason() -> str:
    return (f"too long: the line is over {MAX_LINE_BYTES:,} bytes, the limit of one row; split the text, or check "
            "that the file has one row per line")


class _Duplicated(dict):
    """A parsed JSON object that named a field twice (json keeps the last value silently): `duplicate` is it."""

    duplicate = ""


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    marked = _Duplicated(value)
    marked.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


_DECODER = json.JSONDecoder(object_pairs_hook=_object_hook)


def loads(text: str) -> Any:
    """json.loads whose objects that name a field twice are marked (found by `structure`)."""
    return _DECODER.decode(text)


def structure(value: Any, limit: int) -> tuple[int, str | None]:
    """(depth of nested lists/objects, a field some object names twice or None), level by level without
    recursion, stopping past `limit` levels. A string is depth 0."""
    depth, level, duplicate = 0, [value], None
    while level := [node for node in level if isinstance(node, (list, dict))]:
        depth += 1
        duplicate = duplicate or next((node.duplicate for node in level if isinstance(node, _Duplicated)), None)
        if depth > limit:
            break
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)]
    return depth, duplicate


def row_shape_problem(value: Any) -> str:
    """Why a parsed row is not usable as a row ("" when it is): not an object, too many fields, too deep."""
    if not isinstance(value, dict):
        return f"not a JSON object: got {json_type_name(value)}; each row must be an object like {{\"prompt\": ...}}"
    if len(value) > MAX_FIELDS:
        return f"too many fields: {len(value):,}, more than the limit of {MAX_FIELDS} a row; keep only the data columns"
    depth, duplicate = structure(value, MAX_NESTING)
    if depth > MAX_NESTING:
        return (f"nested too deeply: lists/objects more than {MAX_NESTING} levels deep; a row holds text fields "
                "or lists of {role, content} messages")
    if duplicate is not None:
        return (f"duplicate field: {excerpt(duplicate, 40)} appears twice in one object, and only one value can "
                "count; remove one of them")
    return ""


def parse_json_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(object, "") for a good line, (None, reason) otherwise."""
    if b"\x00" in raw:
        return None, f"not UTF-8 text: a NUL byte at byte {raw.index(0)} of the line (binary data or UTF-16?)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, (
            f"not UTF-8: byte {raw[error.start]:#04x} at byte {error.start} of the line; "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )
    try:
        value = loads(text)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON: {error.msg} at column {error.colno}; each line must be one complete JSON object"
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        return None, f"not usable JSON: {clip(str(error).split(';')[0], 120)}"
    except RecursionError:
        return None, f"nested too deeply: lists/objects more than {MAX_NESTING} levels deep"
    reason = row_shape_problem(value)
    return (None, reason) if reason else (value, "")


def scan_json_lines(path: Path, source: str) -> RawRows:
    """Parse a JSON-lines file line by line, collecting every unreadable line instead of stopping."""
    refuse_non_text_file(path, source)
    rows: list[dict[str, Any] | None] = []
    lines: list[int] = []
    problems: list[RowProblem] = []
    with open(path, "rb") as handle:
        for line_number, raw in bounded_lines(handle):
            if raw is not None and line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw is not None and not raw.strip():
                continue  # blank lines are allowed and skipped
            value, reason = (None, too_long_reason()) if raw is None else parse_json_line(raw)
            if reason:
                problems.append(RowProblem(len(rows), "", reason, line_number))
            lines.append(line_number)
            rows.append(value)
    if not rows:
        raise empty_file_error(source)
    return RawRows(source, rows, lines, problems)


def _document(path: Path, source: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_JSON_DOCUMENT_BYTES:
        raise InvalidDataError(
            source, [], f"the file is {size:,} bytes, more than the {MAX_JSON_DOCUMENT_BYTES:,} a .json array may hold",
            "write the rows as JSON lines (.jsonl, one object per line), which is read one row at a time",
        )
    return path.read_bytes().removeprefix(codecs.BOM_UTF8)


def read_json(path: Path, source: str) -> RawRows:
    """A .json file: a top-level array of objects, or JSON lines under a .json name."""
    refuse_non_text_file(path, source)
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if not head:
        raise empty_file_error(source)
    if not head.startswith(b"["):
        rows = scan_json_lines(path, source)
        if rows.problems and all(row is None for row in rows.rows) and _parses_as_one_object(path, source):
            raise InvalidDataError(
                source, [], "the file holds a single JSON object, not a list of rows",
                "write one object per line (JSON lines, .jsonl) or a top-level JSON array of row objects",
            )
        return rows
    data = _document(path, source)
    try:
        document = loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise InvalidDataError(
            source, [], f"not UTF-8 at line {_line_at(data, error.start)} (byte {error.start})", NOT_UTF8_FIX
        ) from None
    except json.JSONDecodeError as error:
        raise InvalidDataError(
            source, [], f"not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            "fix the JSON syntax there (a JSON-lines file should be named .jsonl)",
        ) from None
    except ValueError as error:  # after JSONDecodeError, its subclass: e.g. an integer of more than 4300 digits
        digits = re.search(rb"\d{4301}", data)
        where = f" at line {_line_at(data, digits.start())}" if digits else ""
        raise InvalidDataError(source, [], f"not usable JSON{where}: {clip(str(error).split(';')[0], 120)}",
                               "fix the value there (write a long number as a string)") from None
    except RecursionError:
        deep = re.search(rb"[\[{](?:\s*[\[{]){%d,}" % MAX_NESTING, data)
        where = f" from line {_line_at(data, deep.start())}" if deep else ""
        raise InvalidDataError(
            source, [], f"nested too deeply{where}: lists/objects more than {MAX_NESTING} levels deep",
            "a row holds text fields or lists of {role, content} messages; fix the file's structure",
        ) from None
    if not isinstance(document, list):  # a JSON value that is no array, e.g. `[` was a prefix of whitespace
        raise InvalidDataError(source, [], f"the file holds a JSON {json_type_name(document)}, not an array of rows",
                               "write a top-level JSON array of row objects, or JSON lines (.jsonl)")
    if not document:
        raise empty_file_error(source)
    problems, rows = [], []
    for index, value in enumerate(document):
        reason = row_shape_problem(value)
        if reason:
            problems.append(RowProblem(index, "", reason.replace("each row must", "every array element must")))
        rows.append(None if reason else value)
    return RawRows(source, rows, None, problems)


def _parses_as_one_object(path: Path, source: str) -> bool:
    try:
        return isinstance(json.loads(_document(path, source).decode("utf-8")), dict)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False


def _text_lines(handle: BinaryIO, source: str) -> Iterator[str]:
    """The file's lines as text for the csv module; a line that is too long or not UTF-8 stops the read."""
    for number, raw in bounded_lines(handle):
        if raw is None:
            raise InvalidDataError(source, [], f"line {number} is {too_long_reason()}", "fix that line of the file")
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidDataError(
                source, [], f"line {number} is not UTF-8 text: byte {raw[error.start]:#04x} at byte {error.start}",
                NOT_UTF8_FIX,
            ) from None


def read_csv(path: Path, source: str) -> RawRows:
    """A CSV file with a header line; every cell is text, an empty cell is None."""
    refuse_non_text_file(path, source)
    rows: list[dict[str, Any] | None] = []
    lines: list[int] = []
    problems: list[RowProblem] = []
    previous_limit = csv.field_size_limit(MAX_LINE_BYTES)  # the module's limit is global: restored below
    try:
        with open(path, "rb") as handle:
            reader = csv.reader(_text_lines(handle, source))
            header, header_line, last_line = None, 0, 0
            try:
                for record in reader:
                    start, last_line = last_line + 1, reader.line_num
                    if not record or (len(record) == 1 and not record[0].strip()):
                        continue  # blank line
                    if header is None:
                        header, header_line = _csv_header(record, source, start), start
                        continue
                    if len(record) != len(header):
                        reason = (f"has {len(record)} fields, the header (line {header_line}) has {len(header)}; "
                                  "quote fields that contain commas or line breaks")
                        problems.append(RowProblem(len(rows), "", reason, start))
                        rows.append(None)
                    else:
                        rows.append({name: cell if cell != "" else None for name, cell in zip(header, record)})
                    lines.append(start)
            except csv.Error as error:
                raise InvalidDataError(source, [], f"line {reader.line_num} is not valid CSV: {clip(str(error), 120)}",
                                       "fix the quoting on that line (a cell with a quote, comma or line break "
                                       "is written between double quotes, with inner quotes doubled)") from None
    finally:
        csv.field_size_limit(previous_limit)
    if header is None or not rows:
        raise empty_file_error(source)
    return RawRows(source, rows, lines, problems, is_csv=True)


def _csv_header(record: list[str], source: str, line: int) -> list[str]:
    if len(record) > MAX_FIELDS:
        raise InvalidDataError(source, [], f"the header (line {line}) has {len(record):,} columns, more than the "
                               f"limit of {MAX_FIELDS}", "keep only the data columns (prompt, chosen, rejected, ...)")
    seen: set[str] = set()
    for name in record:
        if name in seen:
            raise InvalidDataError(source, [], f"the header (line {line}) names the column {excerpt(name, 40)} twice",
                                   "give every column its own name")
        seen.add(name)
    return record
