"""Tests of trainables/data.py: layouts from every file format, validation errors that name file, row, line
and field, drop_invalid accounting, column mapping, implicit prompts and SFT examples.
Run with `python -m pytest tests/test_data.py -q`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers_tokenizer import build_bpe_tokenizer
from trainables.data import (
    DataSourceError,
    InvalidDataError,
    PreferencePair,
    PromptAnswer,
    dataset_fingerprint,
    extract_implicit_prompt,
    load_preference_pairs,
    load_prompt_answers,
)

EXPLICIT_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."},
    {"prompt": "Name a pet.", "chosen": "A cat.", "rejected": "A rock."},
]
EXPLICIT_PAIRS = [PreferencePair(**row) for row in EXPLICIT_ROWS]
CONVERSATIONAL_ROWS = [
    {"prompt": [{"role": "user", "content": "hi"}],
     "chosen": [{"role": "assistant", "content": "hello there"}],
     "rejected": [{"role": "assistant", "content": "go away"}]},
]
CONVERSATIONAL_PAIRS = [PreferencePair("<|user|>\nhi</s>\n<|assistant|>\n", "hello there", "go away")]
HH_ROWS = [
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5."},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine, thanks.",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Go away."},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the suffix names (.jsonl, .json array, .parquet, .csv)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def good_lines() -> list[bytes]:
    return [json.dumps(row).encode() for row in EXPLICIT_ROWS]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("layout", ["auto", "explicit"])
def test_explicit_pairs_load_from_every_format(tmp_path, suffix, layout):
    path = write_rows(tmp_path / f"pairs{suffix}", EXPLICIT_ROWS)
    assert load_preference_pairs(str(path), layout=layout) == EXPLICIT_PAIRS


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("layout", ["auto", "conversational"])
def test_conversational_pairs_render_with_chat_template_without_eos(tmp_path, suffix, layout):
    path = write_rows(tmp_path / f"pairs{suffix}", CONVERSATIONAL_ROWS)
    pairs = load_preference_pairs(str(path), layout=layout, chat_template_tokenizer=build_bpe_tokenizer())
    assert pairs == CONVERSATIONAL_PAIRS


@pytest.mark.parametrize("with_prompt_column", [False, True])
def test_conversational_full_conversations_split_at_shared_prefix(tmp_path, with_prompt_column):
    user = {"role": "user", "content": "hi"}
    row = {"chosen": [user, {"role": "assistant", "content": "hello there"}],
           "rejected": [user, {"role": "assistant", "content": "go away"}]}
    if with_prompt_column:
        row["prompt"] = [user]
    path = write_rows(tmp_path / "full.jsonl", [row])
    assert load_preference_pairs(str(path), chat_template_tokenizer=build_bpe_tokenizer()) == CONVERSATIONAL_PAIRS


def test_conversational_needs_a_tokenizer_with_a_chat_template(tmp_path):
    path = write_rows(tmp_path / "conv.jsonl", CONVERSATIONAL_ROWS)
    with pytest.raises(ValueError, match="chat_template_tokenizer"):
        load_preference_pairs(str(path))
    with pytest.raises(ValueError, match="no chat_template"):
        load_preference_pairs(str(path), chat_template_tokenizer=build_bpe_tokenizer(chat_template=None))


def test_chat_template_whose_generation_prompt_is_not_a_prefix_is_reported(tmp_path):
    mismatched = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    path = write_rows(tmp_path / "conv.jsonl", CONVERSATIONAL_ROWS)
    with pytest.raises(InvalidDataError, match=r"row 0 \(line 1\), field 'chosen': chat template: .* not a prefix"):
        load_preference_pairs(str(path), chat_template_tokenizer=build_bpe_tokenizer(chat_template=mismatched))


@pytest.mark.parametrize("layout", ["auto", "implicit_prompt"])
def test_implicit_prompt_extraction_on_anthropic_hh_rows(tmp_path, layout):
    pairs = load_preference_pairs(str(write_rows(tmp_path / "hh.jsonl", HH_ROWS)), layout=layout)
    assert pairs[0] == PreferencePair("\n\nHuman: What is 2+2?\n\nAssistant:", " It is 4.", " It is 5.")
    assert pairs[1].prompt.endswith("how are you?\n\nAssistant:") and pairs[1].prompt.count("Assistant:") == 2
    assert (pairs[1].chosen, pairs[1].rejected) == (" Fine, thanks.", " Go away.")


def test_implicit_prompt_cuts_after_marker_else_at_last_whitespace_never_inside_a_word():
    chosen, rejected = "The cat sat on the mat", "The cat sat on the map"
    assert chosen[: extract_implicit_prompt(chosen, rejected)] == "The cat sat on the"
    chosen, rejected = "Question: 2+2?\nfour", "Question: 2+2?\nfive"
    assert chosen[: extract_implicit_prompt(chosen, rejected)] == "Question: 2+2?\n"
    assert extract_implicit_prompt("catalog", "catapult") == 0
    chosen, rejected = "<|user|>\nhi there</s>\n<|assistant|>\nhello", "<|user|>\nhi there</s>\n<|assistant|>\nhey"
    assert chosen[: extract_implicit_prompt(chosen, rejected)] == "<|user|>\nhi there</s>\n<|assistant|>\n"


def test_implicit_rows_without_shared_prompt_are_invalid(tmp_path):
    path = write_rows(tmp_path / "hh.jsonl", [*HH_ROWS, {"chosen": "yes", "rejected": "no"}])
    expected = "row 2 (line 3), field 'prompt': empty prompt after implicit extraction"
    with pytest.raises(InvalidDataError, match=re.escape(expected)):
        load_preference_pairs(str(path))


def test_no_layout_fits_error_names_the_columns_found(tmp_path):
    path = write_rows(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InvalidDataError, match=r"no layout fits the columns found: \['question', 'answer'\]"):
        load_preference_pairs(str(path))


def test_forcing_a_layout_that_does_not_match_the_values_reports_wrong_types(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", EXPLICIT_ROWS)
    expected = "field 'chosen': wrong type: expected a list of {role, content} messages, got string"
    with pytest.raises(InvalidDataError, match=re.escape(expected)):
        load_preference_pairs(str(path), layout="conversational", chat_template_tokenizer=build_bpe_tokenizer())
    with pytest.raises(ValueError, match="layout must be one of"):
        load_preference_pairs(str(path), layout="chat")


BAD_LINES = {
    "missing field": (b'{"prompt": "p", "rejected": "r"}', "field 'chosen': missing"),
    "null": (b'{"prompt": "p", "chosen": "c", "rejected": null}', "field 'rejected': null"),
    "number for string": (b'{"prompt": "p", "chosen": 42, "rejected": "r"}',
                          "field 'chosen': wrong type: expected a string, got number"),
    "dict for string": (b'{"prompt": {"a": 1}, "chosen": "c", "rejected": "r"}',
                        "field 'prompt': wrong type: expected a string, got object"),
    "empty": (b'{"prompt": "p", "chosen": "", "rejected": "r"}', "field 'chosen': empty"),
    "whitespace-only": (b'{"prompt": "p", "chosen": "c", "rejected": " \\n\\t"}', "field 'rejected': whitespace-only"),
    "empty prompt": (b'{"prompt": "", "chosen": "c", "rejected": "r"}', "field 'prompt': empty"),
    "chosen == rejected": (b'{"prompt": "p", "chosen": "same", "rejected": "same"}',
                           "field 'rejected': chosen == rejected"),
    "not JSON": (b'{"prompt": "p", "chosen": "c",', "not valid JSON"),
    "not an object": (b'["p", "c", "r"]', "not a JSON object: got list"),
    "non-UTF-8 bytes": (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}', "not UTF-8: byte 0xe9"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_row_kind_names_file_row_line_and_field(tmp_path, kind):
    bad_line, expected = BAD_LINES[kind]
    path = write_lines(tmp_path / "pairs.jsonl", [*good_lines(), bad_line])
    with pytest.raises(InvalidDataError) as raised:
        load_preference_pairs(str(path))
    message = str(raised.value)
    assert str(path) in message and "How to fix" in message
    assert f"row 2 (line 3), {expected}" in message or f"row 2 (line 3): {expected}" in message
    assert [problem.row for problem in raised.value.problems] == [2]


CONVERSATIONAL_BAD = {
    "dict instead of list": ({"role": "assistant", "content": "x"}, "field 'chosen': wrong type: expected a list"),
    "message without role": ([{"content": "x"}], "field 'chosen[0]': message without 'role'"),
    "message without content": ([{"role": "assistant"}], "field 'chosen[0]': message without 'content'"),
    "empty list": ([], "field 'chosen': empty"),
}


@pytest.mark.parametrize("kind", list(CONVERSATIONAL_BAD))
def test_bad_conversational_rows_name_the_message(tmp_path, kind):
    chosen, expected = CONVERSATIONAL_BAD[kind]
    rows = [*CONVERSATIONAL_ROWS, {**CONVERSATIONAL_ROWS[0], "chosen": chosen}]
    path = write_rows(tmp_path / "conv.jsonl", rows)
    with pytest.raises(InvalidDataError, match=re.escape(f"row 1 (line 2), {expected}")):
        load_preference_pairs(str(path), chat_template_tokenizer=build_bpe_tokenizer())


def test_every_bad_row_is_listed_with_lines_counted_past_blank_lines(tmp_path):
    lines = [b"", *good_lines(), b'{"prompt": "p", "chosen": "", "rejected": "r"}', b"   ", b"not json",
             good_lines()[0], b'{"prompt": "p", "chosen": "x", "rejected": "x"}']
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(InvalidDataError) as raised:
        load_preference_pairs(str(path))
    assert [(p.row, p.line) for p in raised.value.problems] == [(2, 4), (3, 6), (5, 8)]
    message = str(raised.value)
    assert "3 of 6 rows are invalid" in message
    for fragment in ("row 2 (line 4), field 'chosen': empty", "row 3 (line 6): not valid JSON",
                     "row 5 (line 8), field 'rejected'"):
        assert fragment in message


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(InvalidDataError, match=rf"{path}: the file is empty"):
        load_preference_pairs(str(path))


def test_ten_megabyte_rows_are_fast_to_load_or_reject(tmp_path):
    big = "word " * 2_000_000  # 10 MB
    good = json.dumps({"prompt": "p", "chosen": big, "rejected": "short"}).encode()
    path = write_lines(tmp_path / "big.jsonl", [good, *good_lines()])
    started = time.perf_counter()
    assert load_preference_pairs(str(path))[0].chosen == big
    assert time.perf_counter() - started < 10
    truncated = write_lines(tmp_path / "truncated.jsonl", [*good_lines(), good[:-2]])
    started = time.perf_counter()
    with pytest.raises(InvalidDataError, match=r"row 2 \(line 3\): not valid JSON"):
        load_preference_pairs(str(truncated))
    assert time.perf_counter() - started < 10


def test_drop_invalid_drops_with_exact_counts_and_fails_past_the_fraction(tmp_path, caplog):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    rows[3]["chosen"] = rows[11]["chosen"] = ""
    rows[7]["rejected"] = rows[7]["chosen"]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="trainables.data"):
        pairs = load_preference_pairs(str(path), drop_invalid=True, max_invalid_fraction=0.2)
    assert [pair.prompt for pair in pairs] == [f"p{i}" for i in range(20) if i not in (3, 7, 11)]
    assert "dropped 3 of 20 rows: 2 empty chosen, 1 chosen == rejected" in caplog.text
    assert "row indices 3, 7, 11" in caplog.text
    expected = r"dropped 3 of 20 rows.*15.0% of the rows, more than max_invalid_fraction=0.1"
    with pytest.raises(InvalidDataError, match=expected):
        load_preference_pairs(str(path), drop_invalid=True, max_invalid_fraction=0.1)


def test_column_mapping_reads_renamed_columns_and_reports_file_names(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in EXPLICIT_ROWS]
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    path = write_rows(tmp_path / "renamed.parquet", rows)
    assert load_preference_pairs(str(path), columns=mapping) == EXPLICIT_PAIRS
    broken = write_rows(tmp_path / "renamed.jsonl", [*rows, {"question": "q", "good": "", "bad": "b"}])
    with pytest.raises(InvalidDataError, match=r"row 2 \(line 3\), field 'good': empty"):
        load_preference_pairs(str(broken), columns=mapping)
    expected = "maps 'chosen' to 'better', which no row has; columns found: ['question', 'good', 'bad']"
    with pytest.raises(InvalidDataError, match=re.escape(expected)):
        load_preference_pairs(str(path), columns={**mapping, "chosen": "better"})
    with pytest.raises(ValueError, match="unknown field 'answer'"):
        load_preference_pairs(str(path), columns={"answer": "good"})


def test_json_array_and_csv_problems_name_the_row(tmp_path):
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps([*EXPLICIT_ROWS, "not a row"]))
    with pytest.raises(InvalidDataError, match=r"row 2: not a JSON object: got string"):
        load_preference_pairs(str(array))
    single = tmp_path / "single.json"
    single.write_text(json.dumps(EXPLICIT_ROWS[0], indent=2))
    with pytest.raises(InvalidDataError, match="a single JSON object"):
        load_preference_pairs(str(single))
    csv = write_rows(tmp_path / "pairs.csv", [*EXPLICIT_ROWS, {"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(InvalidDataError, match=r"row 2 \(line 4\), field 'chosen': null \(an empty CSV cell\)"):
        load_preference_pairs(str(csv))


def test_missing_file_and_unreachable_hub_dataset_name_the_source(tmp_path, monkeypatch):
    import datasets.config

    with pytest.raises(DataSourceError, match="does not exist"):
        load_preference_pairs(str(tmp_path / "nope.jsonl"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here; offline fails at once
    expected = "could not load 'someone/preference-data' (split 'test') as a hub dataset"
    with pytest.raises(DataSourceError, match=re.escape(expected)):
        load_preference_pairs("someone/preference-data", split="test")


def test_unknown_extension_needs_a_format_hint(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("".join(json.dumps(row) + "\n" for row in EXPLICIT_ROWS))
    with pytest.raises(DataSourceError, match="unknown data format '.txt'.*data_files_hint"):
        load_preference_pairs(str(path))
    assert load_preference_pairs(str(path), data_files_hint="jsonl") == EXPLICIT_PAIRS


def test_dataset_fingerprint_follows_file_bytes_and_hub_split(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", EXPLICIT_ROWS)
    before = dataset_fingerprint(str(path))
    assert dataset_fingerprint(str(path)) == before
    write_rows(path, EXPLICIT_ROWS[:1])
    assert dataset_fingerprint(str(path)) != before
    assert dataset_fingerprint("org/name", "train") != dataset_fingerprint("org/name", "test")


def test_invalid_data_error_survives_pickling_with_its_problems(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [*good_lines(), b"oops"])
    with pytest.raises(InvalidDataError) as raised:
        load_preference_pairs(str(path))
    copy = pickle.loads(pickle.dumps(raised.value))
    assert str(copy) == str(raised.value) and copy.problems == raised.value.problems


@pytest.mark.parametrize("answer_column", ["completion", "answer", "response"])
def test_sft_prompt_and_completion_columns(tmp_path, answer_column):
    path = write_rows(tmp_path / "sft.jsonl", [{"prompt": "Say hi.", answer_column: "hi"}])
    assert load_prompt_answers(str(path)) == [PromptAnswer("Say hi.", "hi")]


def test_sft_messages_use_the_last_assistant_turn_as_answer(tmp_path):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    path = write_rows(tmp_path / "sft.parquet", [{"messages": conversation}])
    [example] = load_prompt_answers(str(path), chat_template_tokenizer=build_bpe_tokenizer())
    prompt = "<|user|>\nhi</s>\n<|assistant|>\nhello</s>\n<|user|>\nbye</s>\n<|assistant|>\n"
    assert example == PromptAnswer(prompt, "see you")


def test_sft_bad_rows_are_listed(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "?"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}]
    path = write_rows(tmp_path / "sft.jsonl", rows)
    with pytest.raises(InvalidDataError) as raised:
        load_prompt_answers(str(path), chat_template_tokenizer=build_bpe_tokenizer())
    message = str(raised.value)
    assert "row 0 (line 1), field 'messages': no assistant turn" in message
    assert "row 1 (line 2), field 'messages': 1 message(s) after the last assistant turn" in message
    assert "row 2 (line 3), field 'messages': whitespace-only" in message
    with pytest.raises(InvalidDataError, match=r"no SFT layout fits the columns found: \['prompt', 'chosen'\]"):
        load_prompt_answers(str(write_rows(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c"}])))
