"""Load and validate preference pairs (DPO) and prompt/answer examples (SFT) into plain text.

Layouts of a preference file (auto-detected from the columns and value types, or forced with layout=):
- explicit:        prompt, chosen, rejected are strings.
- conversational:  chosen/rejected are lists of {role, content} messages; prompt is an optional list of
                   messages. Without a prompt, chosen and rejected are full conversations and the prompt is
                   their shared leading messages. With a prompt, chosen/rejected are either the assistant
                   turns only or full conversations starting with the prompt. Rendered with the tokenizer's
                   chat template (trainables/chat_rendering.py).
- implicit_prompt: only chosen/rejected full texts sharing a prefix (Anthropic HH); see extract_implicit_prompt.
Every row is validated before anything is returned; all problems are reported at once (InvalidDataError),
or, with drop_invalid=True, bad rows are dropped and counted. A RowCheck (`after=`) runs on the valid rows
at once, and the rows it faults count the same way: training uses it for the checks after tokenisation
and truncation (trainables/tokenization.py `pair_token_check`). Answers are returned without eos: the
tokenizer step appends it. num_proc (data.num_proc) splits the rows into contiguous chunks converted and
checked in forked processes (trainables/row_processes.py); the values, the problems and their order are
those of one process.
Tested by `python -m pytest tests/test_data.py tests/test_adversarial_data.py -q`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Callable

from trainables.chat_rendering import ChatRenderer, render_answers, same_messages, shared_message_count
from trainables.data_sources import (
    DEFAULT_FIX,
    DataSourceError,
    InvalidDataError,
    RawRows,
    RowProblem,
    RowReader,
    dataset_fingerprint,
    excerpt,
    read_rows,
    show_columns,
)
from trainables.row_processes import DataWorkerError, over_ranges, resolve_num_proc, without_gc

__all__ = [
    "DataSourceError", "DataWorkerError", "InvalidDataError", "PreferencePair", "PromptAnswer", "RowCheck", "RowProblem",
    "dataset_fingerprint", "extract_implicit_prompt", "load_preference_pairs", "load_prompt_answers",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "explicit", "conversational", "implicit_prompt")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
ANSWER_ALIASES = ("completion", "answer", "response")
ASSISTANT_MARKERS = ("\n\nAssistant:", "Assistant:", "<|assistant|>", "<|assistant|>\n", "assistant\n")
IDENTICAL = "chosen == rejected: the pair expresses no preference; fix or remove it"


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair as plain text (chat template already applied)."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PromptAnswer:
    """One SFT example as plain text (chat template already applied)."""

    prompt: str
    answer: str


def extract_implicit_prompt(chosen: str, rejected: str) -> int:
    """Where the shared prompt of two full texts ends (chosen[:end] is the prompt).

    Rule: take the longest common prefix of chosen and rejected. If it contains an assistant marker
    (ASSISTANT_MARKERS: "\\n\\nAssistant:", "Assistant:", "<|assistant|>" with or without "\\n", "assistant\\n"),
    cut right after the marker occurrence that ends last, so the prompt ends with the marker (as TRL does
    for Anthropic HH; the answer keeps its leading space). Otherwise cut at the last whitespace of the
    common prefix, never inside a word: a newline stays at the end of the prompt, a space or tab starts
    the answers (the way BPE tokenizers attach a space to the following word). Returns 0 when there is
    no such boundary (the row is then reported as having an empty prompt).
    """
    prefix = os.path.commonprefix([chosen, rejected])
    marker_ends = [prefix.rfind(marker) + len(marker) for marker in ASSISTANT_MARKERS if marker in prefix]
    if marker_ends:
        return max(marker_ends)
    last_space = max(prefix.rfind(character) for character in " \t\r\n")
    if last_space < 0:
        return 0
    return last_space + 1 if prefix[last_space] == "\n" else last_space


def _explicit_pair(row: RowReader, renderer: ChatRenderer | None) -> PreferencePair | None:
    prompt, chosen, rejected = row.text("prompt"), row.text("chosen"), row.text("rejected")
    if chosen is not None and chosen == rejected:
        row.flag("rejected", IDENTICAL)
    return None if row.problems else PreferencePair(prompt, chosen, rejected)


def _implicit_pair(row: RowReader, renderer: ChatRenderer | None) -> PreferencePair | None:
    chosen, rejected = row.text("chosen"), row.text("rejected")
    if row.problems:
        return None
    if chosen == rejected:
        row.flag("rejected", IDENTICAL)
        return None
    end = extract_implicit_prompt(chosen, rejected)
    if not chosen[:end].strip():
        row.flag("prompt", "empty prompt after implicit extraction: chosen and rejected share no text up to an "
                 "assistant marker or whitespace; add a prompt column and use the explicit layout")
        return None
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[end:].strip():
            row.flag(field, "empty after removing the shared prompt: the text is only the prompt")
    return None if row.problems else PreferencePair(chosen[:end], chosen[end:], rejected[end:])


def _conversational_pair(row: RowReader, renderer: ChatRenderer | None) -> PreferencePair | None:
    has_prompt = row.mapping["prompt"] in row.values and row.values[row.mapping["prompt"]] is not None
    prompt = row.messages("prompt") if has_prompt else None
    chosen, rejected = row.messages("chosen"), row.messages("rejected")
    if row.problems:
        return None
    if same_messages(chosen, rejected):
        row.flag("rejected", IDENTICAL)
        return None
    if prompt is None:
        shared = shared_message_count(chosen, rejected)
        if shared == 0:
            row.flag("chosen", "no prompt: there is no prompt field and chosen/rejected share no leading messages; "
                     "add a prompt list of messages or give full conversations that start with the same turns")
            return None
        prompt = chosen[:shared]
    answers = {
        field: messages[len(prompt):] if same_messages(messages[: len(prompt)], prompt) else messages
        for field, messages in (("chosen", chosen), ("rejected", rejected))
    }
    rendered = render_answers(row, renderer, prompt, answers)
    return None if rendered is None else PreferencePair(rendered[0], *rendered[1])


def _detect_pair_layout(raw: RawRows, mapping: dict[str, str]) -> str:
    columns = raw.columns()
    if mapping["chosen"] not in columns or mapping["rejected"] not in columns:
        raise InvalidDataError(
            raw.source, [], f"no layout fits the columns found: {show_columns(columns)}",
            "preference data needs 'chosen' and 'rejected' columns (strings or message lists) and usually a "
            "'prompt'; map differently named columns with columns={'prompt': ..., 'chosen': ..., 'rejected': ...}",
        )
    kinds = Counter(
        type(row[mapping[field]]) for row in raw.rows if row is not None
        for field in ("chosen", "rejected") if isinstance(row.get(mapping[field]), (str, list))
    )
    if kinds[list] > kinds[str]:
        return "conversational"
    return "explicit" if mapping["prompt"] in columns else "implicit_prompt"


def _column_mapping(columns: dict[str, str] | None, canonical: tuple[str, ...], source: str) -> dict[str, str]:
    mapping = {name: name for name in canonical}
    for name, column in (columns or {}).items():
        if name not in canonical:
            raise InvalidDataError(source, [], f"columns maps unknown field {excerpt(name, 40)}; known fields: "
                                   f"{list(canonical)}", "fix the keys of the column mapping (data.columns)")
        mapping[name] = column
    return mapping


def _check_mapped_columns(raw: RawRows, columns: dict[str, str] | None) -> None:
    found = raw.columns()
    for name, column in (columns or {}).items():
        if column not in found:
            raise InvalidDataError(
                raw.source, [], f"columns maps {excerpt(name, 40)} to {excerpt(column, 40)}, which no row has; "
                f"columns found: {show_columns(found)}",
                "fix the column mapping (data.columns) to name columns that exist",
            )


@dataclass(frozen=True)
class RowCheck:
    """A check of all valid rows at once, after they are read (tokenisation: trainables/tokenization.py).

    run(rows, tally) gives per row (value, faults): the value replaces the row in what the loader returns;
    faults, (field, reason) pairs with canonical field names, make the row invalid like any other bad row
    (listed with its line, or dropped and counted under drop_invalid). fixes: how to fix such rows, for the
    message: {phrase: advice}, each advice given when some fault's reason holds its phrase. run may count
    things in `tally` (a Counter); the counts of every row range are summed and given to report() once.
    """

    run: Callable[[list, Counter], list[tuple[Any, list[tuple[str, str]]]]]
    fixes: dict[str, str] = dataclass_field(default_factory=dict)
    report: Callable[[Counter], None] | None = None

    def advice(self, reasons: set[str]) -> str:
        return "".join(f"; {fix}" for phrase, fix in self.fixes.items() if any(phrase in reason for reason in reasons))


def _collect(raw: RawRows, mapping: dict[str, str], convert: Callable, renderer, *, drop_invalid: bool,
             max_invalid_fraction: float, after: RowCheck | None = None, num_proc: int | None = None) -> list:
    """Convert every row, run `after` on the good ones, then raise or drop according to drop_invalid.

    num_proc: processes for the conversion and `after` (resolve_num_proc); the result, the problems and their
    order are the same for any number. raw.rows are released (set to None) as their ranges are done."""
    if not 0.0 <= max_invalid_fraction <= 1.0:
        raise InvalidDataError(raw.source, [], f"max_invalid_fraction must be within [0, 1], got {max_invalid_fraction}",
                               "set data.max_invalid_fraction between 0 and 1")

    def convert_range(start: int, stop: int) -> tuple[list, list[RowProblem], set[str], Counter]:
        """Rows [start, stop): (values of the good rows, problems, fault reasons, the check's tally). Each row is
        converted and checked on its own, so ranges concatenated in order give exactly what one pass gives."""
        results, kept_rows, problems = [], [], []
        for index in range(start, stop):
            if raw.rows[index] is None:
                continue  # unreadable line, already in raw.problems
            row = RowReader(raw.rows[index], index, raw.line_of(index), mapping, raw.is_csv)
            result = convert(row, renderer)
            problems += row.problems
            if result is not None and not row.problems:
                results.append(result)
                kept_rows.append(index)
        tally: Counter = Counter()
        if after is None or not results:
            return results, problems, set(), tally
        checked, results, reasons = after.run(results, tally), [], set()
        for index, (value, faults) in zip(kept_rows, checked):
            problems += [RowProblem(index, mapping.get(name, name), reason, raw.line_of(index)) for name, reason in faults]
            reasons.update(reason for _, reason in faults)
            if not faults:
                results.append(value)
        return results, problems, reasons, tally

    results, problems, reasons, tally = [], list(raw.problems), set(), Counter()
    processes = resolve_num_proc(num_proc, len(raw.rows))
    for start, stop, (part_results, part_problems, part_reasons, part_tally) in over_ranges(
            convert_range, len(raw.rows), processes, raw.source):
        raw.rows[start:stop] = [None] * (stop - start)  # converted: the rows' dicts and texts are freed as we go
        results += part_results
        problems += part_problems
        reasons |= part_reasons
        tally.update(part_tally)
    if after is not None and after.report is not None:
        after.report(tally)
    extra_fix = after.advice(reasons) if after is not None else ""
    if not problems:
        return results
    problems.sort(key=lambda problem: problem.row)  # stable: a row's own problems keep their order
    total, bad_rows = len(raw.rows), sorted({problem.row for problem in problems})
    if not drop_invalid:
        raise InvalidDataError(raw.source, problems, f"{len(bad_rows)} of {total} rows are invalid", DEFAULT_FIX + extra_fix)
    counts = Counter(problem.kind() for problem in problems).most_common()
    summary = f"dropped {len(bad_rows)} of {total} rows: " + ", ".join(
        f"{count} {kind}" for kind, count in counts[:6]
    ) + (f", and {len(counts) - 6} other kinds of problem" if len(counts) > 6 else "")
    if len(bad_rows) / total > max_invalid_fraction or not results:
        raise InvalidDataError(
            raw.source, problems, f"{summary}; that is {len(bad_rows) / total:.1%} of the rows, more than "
            f"max_invalid_fraction={max_invalid_fraction}",
            "fix the data, or raise max_invalid_fraction (data.max_invalid_fraction) if dropping that many rows is "
            "intended" + extra_fix,
        )
    shown = ", ".join(map(str, bad_rows[:20])) + (", ..." if len(bad_rows) > 20 else "")
    logger.warning("%s: %s (row indices %s)", raw.source, summary, shown)
    return results


@without_gc
def load_preference_pairs(
    source: str, *, split: str = "train", layout: str = "auto", columns: dict[str, str] | None = None,
    chat_template_tokenizer=None, drop_invalid: bool = False, max_invalid_fraction: float = 0.05,
    data_files_hint: str | None = None, after: RowCheck | None = None, num_proc: int | None = None,
) -> list:
    """Read, validate and render preference pairs from a local file or hub dataset (see module docstring).

    columns maps canonical fields to the file's names, e.g. {"prompt": "question", "chosen": "good",
    "rejected": "bad"}. Raises InvalidDataError listing every bad row, unless drop_invalid=True, which drops
    them (logged with counts) and raises only when more than max_invalid_fraction of the rows are bad.
    after: a RowCheck run on the valid pairs (e.g. tokenisation); the loader then returns its values.
    num_proc: processes that convert and check the rows (None: auto, see resolve_num_proc); same result for any.
    """
    if layout not in LAYOUTS:
        raise InvalidDataError(source, [], f"layout must be one of {LAYOUTS}, got {excerpt(layout, 40)}",
                               "set data.layout to one of them")
    mapping = _column_mapping(columns, PAIR_FIELDS, source)
    raw = read_rows(source, split=split, data_files_hint=data_files_hint)
    _check_mapped_columns(raw, columns)
    detected = _detect_pair_layout(raw, mapping)
    chosen_layout = detected if layout == "auto" else layout
    if chosen_layout == "explicit" and mapping["prompt"] not in raw.columns():
        raise InvalidDataError(
            source, [], f"layout 'explicit' needs a '{mapping['prompt']}' column; columns found: "
            f"{show_columns(raw.columns())}",
            "map the prompt column with columns={'prompt': ...}, or use layout='implicit_prompt'",
        )
    renderer = None
    if chosen_layout == "conversational":
        renderer = ChatRenderer(chat_template_tokenizer, source, _first_list_row(raw, mapping))
    convert = {"explicit": _explicit_pair, "conversational": _conversational_pair, "implicit_prompt": _implicit_pair}
    return _collect(raw, mapping, convert[chosen_layout], renderer, drop_invalid=drop_invalid,
                    max_invalid_fraction=max_invalid_fraction, after=after, num_proc=num_proc)


def _first_list_row(raw: RawRows, mapping: dict[str, str]) -> str:
    """Where the first row with message lists is, e.g. "row 0 (line 1)" ("" when there is none)."""
    for index, row in enumerate(raw.rows):
        if row is not None and any(isinstance(row.get(mapping[name]), list) for name in PAIR_FIELDS):
            line = raw.line_of(index)
            return f"row {index}" + (f" (line {line})" if line is not None else "")
    return ""


def _messages_example(row: RowReader, renderer_factory: Callable[[RowReader], ChatRenderer]) -> PromptAnswer | None:
    """SFT row with a "messages" conversation: the last assistant turn is the answer."""
    messages = row.messages("messages")
    if messages is None:
        return None
    assistant_turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistant_turns:
        row.flag("messages", "no assistant turn: the last assistant message is the answer, and there is none")
        return None
    last = assistant_turns[-1]
    if last != len(messages) - 1:
        row.flag("messages", f"{len(messages) - 1 - last} message(s) after the last assistant turn; end the "
                 "conversation with the answer")
        return None
    rendered = render_answers(row, renderer_factory(row), messages[:last], {"messages": messages[last:]})
    return None if rendered is None else PromptAnswer(rendered[0], rendered[1][0])


def _prompt_completion_example(row: RowReader,
                               renderer_factory: Callable[[RowReader], ChatRenderer]) -> PromptAnswer | None:
    """SFT row with prompt + completion, both strings or both message lists."""
    if isinstance(row.values.get(row.mapping["prompt"]), list):
        prompt, completion = row.messages("prompt"), row.messages("completion")
        if row.problems:
            return None
        rendered = render_answers(row, renderer_factory(row), prompt, {"completion": completion})
        return None if rendered is None else PromptAnswer(rendered[0], rendered[1][0])
    prompt, completion = row.text("prompt"), row.text("completion")
    return None if row.problems else PromptAnswer(prompt, completion)


@without_gc
def load_prompt_answers(
    source: str, *, split: str = "train", columns: dict[str, str] | None = None, chat_template_tokenizer=None,
    drop_invalid: bool = False, max_invalid_fraction: float = 0.05, data_files_hint: str | None = None,
    after: RowCheck | None = None, num_proc: int | None = None,
) -> list:
    """Read and validate SFT examples: prompt + completion (or "answer"/"response") as strings or message
    lists, or a conversational "messages" list whose last assistant turn is the answer and whose earlier
    turns, rendered with the chat template and generation prompt, are the prompt. Errors as for pairs; `after`
    as for pairs, with the fields "prompt" and "answer" (the completion or messages column)."""
    canonical = ("prompt", "messages", *ANSWER_ALIASES)
    mapping = _column_mapping(columns, canonical, source)
    raw = read_rows(source, split=split, data_files_hint=data_files_hint)
    _check_mapped_columns(raw, columns)
    found = raw.columns()
    given = [alias for alias in ANSWER_ALIASES if alias in (columns or {})]
    answer_column = mapping[given[0]] if given else next((alias for alias in ANSWER_ALIASES if alias in found), None)
    has_pairs = mapping["prompt"] in found and answer_column is not None
    if not has_pairs and mapping["messages"] not in found:
        raise InvalidDataError(
            source, [], f"no SFT layout fits the columns found: {show_columns(found)}",
            "SFT data needs 'prompt' + 'completion' (or 'answer'/'response') columns, or a 'messages' column of "
            "{role, content} lists; map other names with columns={...}",
        )
    mapping["completion"] = answer_column or "completion"
    mapping["answer"] = mapping["completion"] if has_pairs else mapping["messages"]
    convert = _prompt_completion_example if has_pairs else _messages_example  # prompt/completion wins if both
    renderers: list[ChatRenderer] = []

    def renderer_factory(row: RowReader) -> ChatRenderer:  # only conversational rows need a chat template
        if not renderers:
            where = f"row {row.index}" + (f" (line {row.line})" if row.line is not None else "")
            renderers.append(ChatRenderer(chat_template_tokenizer, source, where, "prompt and completion text columns"))
        return renderers[0]

    return _collect(raw, mapping, convert, renderer_factory, drop_invalid=drop_invalid,
                    max_invalid_fraction=max_invalid_fraction, after=after, num_proc=num_proc)
