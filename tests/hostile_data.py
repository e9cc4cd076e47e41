"""Rules that build hostile data files, for the adversarial data corpus (tests/test_adversarial_data.py).

Each rule takes a seeded random.Random (or a seed), so a case is reproducible while the bad row lands at
a different place, with different words, in every case: token twins (two answers that differ as text
but are the same tokens for tests/tiny_world.py's word-level tokenizer, which splits at whitespace and maps
unknown words to <unk>, or that differ only beyond MAX_LENGTH tokens), answers of invisible characters,
files re-encoded or replaced by binary data, and values too big to print. Not run on its own.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import random
import string
from pathlib import Path

from tests.tiny_world import WORDS, pair_rows

MAX_LENGTH = 32  # the twin cases set data.max_length to this, so a difference after ~24 answer tokens is cut away
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"  # characters a tokenizer's normalizer may remove
ROWS = 12
ENCODINGS = ("utf-16", "utf-16-be-bom", "utf-16-le", "utf-32", "latin-1", "cp1252", "gzip", "binary", "parquet-bytes")


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows in the format the suffix names, as UTF-8 text: .jsonl, .json (an indented array) or .csv (header
    line first). (tiny_world.write_jsonl writes ASCII, with \\u escapes.)"""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return path
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def unknown_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(6, 10))) + "q"  # no such word


def twin_answers(cause: str, rng: random.Random) -> tuple[str, str]:
    """Two different texts that the tiny tokenizer (words split at whitespace, unknown words -> <unk>) and
    data.max_length=MAX_LENGTH turn into the same answer tokens."""
    words = [rng.choice(WORDS[:12]) for _ in range(rng.randint(2, 5))]
    if cause == "whitespace":
        gaps = [rng.choice([" ", "  ", "\t", " \n ", "\u3000"]) for _ in words[1:]]
        rejected = "".join(w + g for w, g in zip(words, gaps)) + words[-1] + rng.choice(["", " ", "\t", "\n"])
        chosen = " ".join(words)
        return chosen, rejected if rejected != chosen else rejected + " "
    if cause == "unknown-words":
        at = rng.randint(0, len(words))
        return (" ".join(words[:at] + [unknown_word(rng)] + words[at:]),
                " ".join(words[:at] + [unknown_word(rng)] + words[at:]))
    shared = [rng.choice(WORDS[:12]) for _ in range(MAX_LENGTH + rng.randint(0, 12))]
    return " ".join(shared + ["good", "yes"]), " ".join(shared + ["bad", "no"])


def in_layout(layout: str, question: str, chosen: str, rejected: str) -> dict:
    if layout == "explicit":
        return {"prompt": question, "chosen": chosen, "rejected": rejected}
    if layout == "conversational":
        return {"prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"chosen": f"Human: {question} Assistant: {chosen}", "rejected": f"Human: {question} Assistant: {rejected}"}


def rows_with_twins(layout: str, cause: str, seed: int | str, twins: int = 1) -> tuple[list[dict], list[int]]:
    """ROWS good pairs of the layout with `twins` of them (at seeded places) replaced by token twins."""
    rng = random.Random(seed)
    rows = pair_rows(layout, ROWS, seed=rng.randrange(1000))
    places = sorted(rng.sample(range(ROWS), twins))
    for place in places:
        rows[place] = in_layout(layout, "question " + rng.choice(WORDS[:12]), *twin_answers(cause, rng))
    return rows, places


def invisible(rng: random.Random) -> str:
    return "".join(rng.choice(ZERO_WIDTH) for _ in range(rng.randint(1, 6)))


def encoded(text: str, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(text.encode())
    if encoding == "binary":
        rng = random.Random(len(text))
        return b"\x00" + bytes(rng.randrange(256) for _ in range(4000))
    if encoding == "parquet-bytes":
        import pandas as pd

        buffer = io.BytesIO()
        pd.DataFrame(pair_rows("explicit", 3)).to_parquet(buffer)
        return buffer.getvalue()
    if encoding == "utf-16-be-bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode(encoding)  # utf-16 and utf-32 with a byte-order mark; utf-16-le without one


def huge_value(kind: str):
    return {"text": "x" * 1_000_000, "list": list(range(200_000)), "object": {f"k{i}": i for i in range(900)}}[kind]
