"""Adversarial corpus, data files: every bad data file is a clean refusal naming the file and the row or line
(issue 17, promises 1, 4 and 5 for data).

Every input is built by a rule, with the bad row at a random place (seeded), so the corpus checks the
rule and not one file: pairs whose chosen and rejected differ as text but are the same tokens after
tokenisation or truncation (whitespace, unknown words, a difference beyond max_length), in every layout,
in the training and the held-out file, from JSON lines and CSV; answers that tokenise to nothing; files in
other encodings or not text at all; nesting, lone surrogates, over-long lines, too many columns, values
of the wrong type; conversations without a chat template; bad values too big to print. Each runs
`dpo check` (a few `dpo train` / `dpo sft`) through tests/adversarial.refused: exit 2, no traceback, a
short message naming the file and the line, no planted secret out, inputs unchanged, nothing written.
The accepted cases: data.drop_invalid drops such rows and reports the count; CSV answers that look like
numbers are text. Run: `python -m pytest tests/test_adversarial_data.py -q` (under a minute on 2 CPUs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.adversarial import SECRET, refused, run_cli
from tests.hostile_data import (ENCODINGS, MAX_LENGTH, ROWS, ZERO_WIDTH, encoded, huge_value, in_layout, invisible,
                                rows_with_twins, write_rows)
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
LAYOUTS = ("explicit", "conversational", "implicit_prompt")
CAUSES = ("whitespace", "unknown-words", "beyond-max-length")


@pytest.fixture(scope="module", autouse=True)
def _demo_cache_for_module(demo_cache) -> Path:
    return demo_cache


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The tiny model, the same without a chat template, one whose tokenizer drops zero-width characters."""
    root = tmp_path_factory.mktemp("data-world")
    model = build_model_dir(root / "model")
    no_template = shutil.copytree(model, root / "model-no-template")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    for path in no_template.glob("chat_template*"):
        path.unlink()
    drops = shutil.copytree(model, root / "model-drops")
    tokenizer = json.loads((drops / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Replace", "pattern": {"Regex": f"[{ZERO_WIDTH}]"}, "content": ""}
    (drops / "tokenizer.json").write_text(json.dumps(tokenizer))
    return {"root": root, "model": str(model), "no_template": str(no_template), "drops": str(drops),
            "train": write_jsonl(root / "train.jsonl", pair_rows("explicit", ROWS, seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))}


def dpo_args(world: dict, tmp: Path, *extra: str, command: str = "check", train=None, eval_=None, model=None,
             sft=None) -> list[str]:
    """`dpo <command> configs/quickstart.yaml --set ...` on the tiny world, a secret planted in tracking.uri."""
    settings = {
        "model.path": model or world["model"], "data.train": train or world["train"], "data.eval": eval_ or world["eval"],
        "data.sft_train": sft or "null", "output_dir": str(tmp / "out"), "reference.cache_dir": str(tmp / "cache"),
        "train.max_steps": "2", "train.batch_size": "4", "train.eval_every": "2", "train.device": "cpu",
        "tracking.uri": f"http://alice:{SECRET}@127.0.0.1:5000",
    }
    args = [command, str(QUICKSTART)]
    for key, value in [*settings.items(), *(item.split("=", 1) for item in extra)]:
        args += ["--set", f"{key}={value}"]
    return args


def line_of(path: Path, row: int) -> int:
    """The line a row starts on: JSON lines one a line, CSV after its header line."""
    return row + (2 if path.suffix == ".csv" else 1)


def check_refused(world: dict, tmp: Path, path: Path, names: list[str], *extra: str, role: str = "train",
                  command: str = "check", **options):
    files = {"train": {"train": path}, "eval": {"eval_": path}, "sft": {"sft": path}}[role]
    return refused(dpo_args(world, tmp, *extra, command=command, **files, **options), names=[str(path), *names],
                   untouched=[path, Path(world["model"])], written_roots=[tmp], must_not_exist=[tmp / "out"])


# ---- rule 1: chosen and rejected that become the same tokens --------------------------------------------

TWIN_CASES = [pytest.param(layout, cause, role, ".jsonl", id=f"{layout}-{cause}-{role}")
              for layout in LAYOUTS for cause in CAUSES for role in ("train", "eval")]
TWIN_CASES += [pytest.param("explicit", cause, "train", ".csv", id=f"explicit-{cause}-csv") for cause in CAUSES]


@pytest.mark.parametrize("layout, cause, role, suffix", TWIN_CASES)
def test_pairs_identical_after_tokenisation_are_refused(world, tmp_path, layout, cause, role, suffix):
    rows, [place] = rows_with_twins(layout, cause, seed=f"{layout}{cause}{role}{suffix}")
    path = write_rows(tmp_path / f"pairs{suffix}", rows)
    outcome = check_refused(world, tmp_path, path, [f"row {place} (line {line_of(path, place)})",
                                                    "identical after tokenisation/truncation to"],
                            f"data.max_length={MAX_LENGTH}", role=role)
    assert ("max_length" in outcome.stderr) and ("remove the row" in outcome.stderr)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cause", CAUSES)
def test_drop_invalid_drops_token_twins_and_counts_them(world, tmp_path, layout, cause):
    rows, places = rows_with_twins(layout, cause, seed=7, twins=1)
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    outcome = run_cli(dpo_args(world, tmp_path, f"data.max_length={MAX_LENGTH}", "data.drop_invalid=true",
                               "data.max_invalid_fraction=0.1", train=path))
    assert outcome.code == 0 and outcome.escaped is None, outcome.everything
    assert f"ok: {ROWS - 1} training pairs" in outcome.stdout
    assert f"dropped 1 of {ROWS} rows: 1 chosen and rejected are identical after tokenisation/truncation" in outcome.logs
    assert f"row indices {places[0]}" in outcome.logs and SECRET not in outcome.everything


@pytest.mark.parametrize("cause", CAUSES)
def test_drop_invalid_refuses_more_token_twins_than_the_fraction(world, tmp_path, cause):
    rows, places = rows_with_twins("explicit", cause, seed=11, twins=3)
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    check_refused(world, tmp_path, path, ["dropped 3 of 12 rows", "max_invalid_fraction=0.1",
                                          *(f"row {p} (line {p + 1})" for p in places)],
                  f"data.max_length={MAX_LENGTH}", "data.drop_invalid=true", "data.max_invalid_fraction=0.1")


def test_dpo_train_refuses_token_twins_before_any_work(world, tmp_path):
    rows, [place] = rows_with_twins("conversational", "beyond-max-length", seed=3)
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    check_refused(world, tmp_path, path, [f"line {place + 1}", "identical after tokenisation/truncation"],
                  f"data.max_length={MAX_LENGTH}", command="train")


# ---- rule 2: answers that tokenise to nothing ------------------------------------------------------------

EMPTY_CASES = [("explicit", "chosen"), ("explicit", "rejected"), ("conversational", "chosen"),
               ("implicit_prompt", "rejected")]


@pytest.mark.parametrize("layout, field", EMPTY_CASES, ids=[f"{a}-{b}" for a, b in EMPTY_CASES])
def test_answers_that_tokenise_to_nothing_are_refused(world, tmp_path, layout, field):
    rng = random.Random(len(layout) + len(field))
    place, rows = rng.randrange(ROWS), pair_rows(layout, ROWS, seed=5)
    answers = {"chosen": "good yes", "rejected": "bad no", field: invisible(rng)}
    rows[place] = in_layout(layout, "question cat", answers["chosen"], answers["rejected"])
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    check_refused(world, tmp_path, path, [f"row {place} (line {place + 1})", "empty after tokenisation"],
                  model=world["drops"])


def test_sft_completion_that_tokenises_to_nothing_is_refused(world, tmp_path):
    rng = random.Random(2)
    rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in pair_rows("explicit", ROWS, seed=4)]
    place = rng.randrange(ROWS)
    rows[place]["completion"] = invisible(rng)
    path = write_rows(tmp_path / "sft.jsonl", rows)
    check_refused(world, tmp_path, path, [f"row {place} (line {place + 1}), field 'completion'", "empty after"],
                  command="sft", role="sft", model=world["drops"])


# ---- rule 3: files that are not UTF-8 text ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_files_that_are_not_utf8_text_are_refused_naming_the_line(world, tmp_path, encoding, suffix):
    rng = random.Random(f"{encoding}{suffix}")
    rows, place = pair_rows("explicit", ROWS, seed=6), rng.randrange(ROWS)
    rows[place]["prompt"] = "question café à la crème"  # not ASCII: Latin-1 bytes are not UTF-8
    text = write_rows(tmp_path / f"utf8{suffix}", rows).read_text(encoding="utf-8")
    data = encoded(text, encoding)
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
        line = 1  # decodes, but holds NUL bytes or a signature from the start
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        line = 1 if b"\x00" in data[:error.start + 1] else line
    outcome = check_refused(world, tmp_path, path, [f"line {line}"])
    assert "UTF-8" in outcome.stderr


# ---- rule 4: structure past the limits: nesting, surrogates, line length, columns --------------------------

@pytest.mark.parametrize("depth", [70, 1_000, 100_000])
@pytest.mark.parametrize("container", ["list", "object"])
def test_deeply_nested_values_are_refused(world, tmp_path, depth, container):
    opening, closing = ("[", "]") if container == "list" else ('{"a": ', "}")
    rng = random.Random(depth)
    lines = [json.dumps(row) for row in pair_rows("explicit", ROWS, seed=8)]
    place = rng.randrange(ROWS)
    lines[place] = '{"prompt": "question", "chosen": ' + opening * depth + "1" + closing * depth + ', "rejected": "no"}'
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    check_refused(world, tmp_path, path, [f"row {place} (line {place + 1})", "nested too deeply"])


@pytest.mark.parametrize("depth", [70, 100_000])
def test_deeply_nested_json_array_is_refused(world, tmp_path, depth):
    rows = [json.dumps(row) for row in pair_rows("explicit", 4, seed=9)]
    rows[2] = '{"prompt": "q", "chosen": ' + "[" * depth + "]" * depth + ', "rejected": "no"}'
    path = tmp_path / "pairs.json"
    path.write_text("[\n" + ",\n".join(rows) + "\n]\n")
    check_refused(world, tmp_path, path, ["row 2" if depth < 1000 else "from line 4", "nested too deeply"])


def test_moderately_nested_value_is_a_wrong_type(world, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = pair_rows("explicit", ROWS, seed=10)
    rows[4]["rejected"] = json.loads("[" * 20 + "]" * 20)
    write_jsonl(path, rows)
    check_refused(world, tmp_path, path, ["row 4 (line 5), field 'rejected'", "wrong type: expected a string, got list"])


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected", "content"])
def test_lone_surrogates_are_refused(world, tmp_path, field):
    rng = random.Random(field)
    layout = "conversational" if field == "content" else "explicit"
    rows, place = pair_rows(layout, ROWS, seed=12), rng.randrange(ROWS)
    surrogate = chr(rng.choice([0xD800, 0xDBFF, 0xDC00, 0xDFFF, rng.randrange(0xD800, 0xE000)]))
    if field == "content":
        rows[place]["chosen"][0]["content"] += surrogate
    else:
        rows[place][field] += surrogate
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)  # json.dumps writes the surrogate as a \\uXXXX escape
    check_refused(world, tmp_path, path, [f"row {place} (line {place + 1})", "lone surrogate"])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_over_long_lines_are_refused_without_reading_them(world, tmp_path, monkeypatch, suffix):
    from trainables import text_files

    monkeypatch.setattr(text_files, "MAX_LINE_BYTES", 4096)
    rows, place = pair_rows("explicit", ROWS, seed=13), 7
    rows[place]["chosen"] = "good " * 1000
    path = write_rows(tmp_path / f"pairs{suffix}", rows)
    check_refused(world, tmp_path, path, [f"line {line_of(path, place)}", "too long", "4,096 bytes"])


def test_a_line_over_the_real_limit_is_refused(world, tmp_path):
    from trainables import text_files

    rows = pair_rows("explicit", ROWS, seed=14)
    rows[3]["chosen"] = "cat " * (text_files.MAX_LINE_BYTES // 4 + 1)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    check_refused(world, tmp_path, path, ["row 3 (line 4)", "too long", f"{text_files.MAX_LINE_BYTES:,} bytes"])


@pytest.mark.parametrize("columns", [1_001, 50_000])
def test_rows_with_too_many_fields_are_refused(world, tmp_path, columns):
    rows = pair_rows("explicit", ROWS, seed=15)
    rows[5].update({f"extra_{i}": "x" for i in range(columns)})
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    check_refused(world, tmp_path, path, ["row 5 (line 6)", "too many fields"])


@pytest.mark.parametrize("change", [-1, 1, 3])
def test_csv_rows_with_another_number_of_fields_are_refused(world, tmp_path, change):
    rows, place = pair_rows("explicit", ROWS, seed=22), random.Random(change).randrange(ROWS)
    lines = write_rows(tmp_path / "good.csv", rows).read_text().splitlines()
    cells = lines[place + 1].split(",")
    lines[place + 1] = ",".join(cells[:change] if change < 0 else cells + ["extra"] * change)
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    check_refused(world, tmp_path, path, [f"row {place} (line {place + 2})", f"has {3 + change} fields"])


def test_a_csv_named_like_a_signature_is_still_text(world, tmp_path):
    rows = [{"PAR1": "notes", **row} for row in pair_rows("explicit", ROWS, seed=23)]  # starts as Parquet does
    path = write_rows(tmp_path / "pairs.csv", rows)
    outcome = run_cli(dpo_args(world, tmp_path, train=path))
    assert outcome.code == 0 and f"ok: {ROWS} training pairs" in outcome.stdout, outcome.everything


def test_csv_header_with_too_many_columns_is_refused(world, tmp_path):
    path = tmp_path / "pairs.csv"
    header = ["prompt", "chosen", "rejected"] + [f"c{i}" for i in range(5000)]
    path.write_text(",".join(header) + "\n" + ",".join(["q", "a", "b"] + [""] * 5000) + "\n")
    check_refused(world, tmp_path, path, ["line 1", "5,003 columns"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("kind", ["duplicate-field", "duplicate-in-message", "huge-integer"])
def test_json_that_cannot_be_taken_at_its_word_is_refused(world, tmp_path, kind, suffix):
    layout = "conversational" if kind == "duplicate-in-message" else "explicit"
    rows, place = [json.dumps(row) for row in pair_rows(layout, ROWS, seed=21)], random.Random(kind).randrange(ROWS)
    rows[place] = {
        "duplicate-field": '{"prompt": "question", "chosen": "good yes", "rejected": "bad no", "chosen": "bad no"}',
        "duplicate-in-message": '{"prompt": [{"role": "user", "content": "question"}], "chosen": [{"role": '
                                '"assistant", "content": "good", "content": "bad"}], "rejected": [{"role": '
                                '"assistant", "content": "bad"}]}',
        "huge-integer": '{"prompt": "question", "chosen": ' + "7" * 5000 + ', "rejected": "bad no"}',
    }[kind]
    path = tmp_path / f"pairs{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]\n")
    where = f"row {place} (line {place + 1})" if suffix == ".jsonl" else f"row {place}"
    if kind == "huge-integer" and suffix == ".json":
        where = f"line {place + 2}"  # the whole array is one JSON value: the line of the number
    check_refused(world, tmp_path, path, [where, "duplicate field" if kind.startswith("duplicate") else "4300 digits"])


def test_a_data_path_that_is_a_pipe_is_refused_without_blocking(world, tmp_path):
    path = tmp_path / "pairs.jsonl"
    os.mkfifo(path)
    check_refused(world, tmp_path, path, ["not a regular file"])


# ---- rule 5: values of the wrong type in text fields; CSV cells are text --------------------------------------

WRONG_VALUES = {"number": 42, "decimal": 3.5, "boolean": True, "null": None, "list": ["good", "yes"],
                "object": {"text": "good"}}


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("kind", list(WRONG_VALUES))
def test_values_of_the_wrong_type_are_refused_in_user_terms(world, tmp_path, field, kind):
    rng = random.Random(f"{field}{kind}")
    rows, place = pair_rows("explicit", ROWS, seed=16), rng.randrange(ROWS)
    rows[place][field] = WRONG_VALUES[kind]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    outcome = check_refused(world, tmp_path, path, [f"row {place} (line {place + 1}), field '{field}'"])
    for python_word in ("NoneType", "dict", "'int'", "float", "'bool'", "str'"):
        assert python_word not in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("numbers", [["42", "7", "1000"], ["3.14", "-1", "1e5"], ["007", "NaN", "null", "true"]])
def test_csv_answers_that_look_like_numbers_are_text(world, tmp_path, numbers):
    rows = [{**row, "chosen": numbers[i % len(numbers)]} for i, row in enumerate(pair_rows("explicit", ROWS, seed=17))]
    path = write_rows(tmp_path / "pairs.csv", rows)
    outcome = run_cli(dpo_args(world, tmp_path, train=path))
    assert outcome.code == 0 and outcome.escaped is None, outcome.everything
    assert f"ok: {ROWS} training pairs" in outcome.stdout


# ---- rule 6: conversations without a chat template ------------------------------------------------------------

@pytest.mark.parametrize("role", ["train", "eval"])
def test_conversations_with_a_tokenizer_without_chat_template_are_refused(world, tmp_path, role):
    path = write_jsonl(tmp_path / "conversations.jsonl", pair_rows("conversational", ROWS, seed=18))
    check_refused(world, tmp_path, path, ["line 1", "chat template", "model.tokenizer_path", "data.layout: explicit"],
                  role=role, model=world["no_template"])


@pytest.mark.parametrize("command", ["sft", "train"])
def test_training_without_chat_template_is_refused_before_any_work(world, tmp_path, command):
    if command == "sft":
        turns = [{"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}]}
                 for row in pair_rows("explicit", ROWS, seed=19)]
        path = write_jsonl(tmp_path / "sft.jsonl", turns)
        check_refused(world, tmp_path, path, ["line 1", "model.tokenizer_path"], command="sft", role="sft",
                      model=world["no_template"])
    else:
        path = write_jsonl(tmp_path / "conversations.jsonl", pair_rows("conversational", ROWS, seed=19))
        check_refused(world, tmp_path, path, ["line 1", "model.tokenizer_path"], command="train",
                      model=world["no_template"])


# ---- rule 7: messages stay short whatever the bad value --------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "list", "object"])
def test_huge_bad_values_are_shown_as_short_excerpts(world, tmp_path, kind):
    rows = pair_rows("explicit", ROWS, seed=20)
    rows[6]["prompt" if kind != "text" else "chosen"] = huge_value(kind)
    if kind == "text":
        rows[6]["rejected"] = huge_value(kind)  # chosen == rejected: a huge identical pair
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    outcome = check_refused(world, tmp_path, path, ["row 6 (line 7)"])
    assert len(outcome.stderr) < 2000 and max(map(len, outcome.stderr.splitlines())) < 500, outcome.stderr


def test_many_bad_rows_are_counted_not_all_listed(world, tmp_path):
    rows = [{"prompt": "question", "chosen": "", "rejected": "no"} for _ in range(500)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    outcome = check_refused(world, tmp_path, path, ["row 0 (line 1)", "500 of 500 rows are invalid", "490 more"])
    assert len(outcome.stderr) < 3000


def test_huge_column_names_are_cut_in_the_message(world, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"q" * 20_000: "x", "w" * 20_000: "y"} for _ in range(3)])
    outcome = check_refused(world, tmp_path, path, ["no layout fits the columns found"])
    assert len(outcome.stderr) < 1500
