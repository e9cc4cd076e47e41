"""Conversations to text with a tokenizer's chat template: the prompt / answer split of conversational rows.

prompt = template(prompt messages, add_generation_prompt=True); answer = template(prompt + answer messages)
minus the prompt text and minus a trailing eos token (the tokenizer step appends eos itself). A template
whose generation prompt is not a prefix of the rendered conversation, or one that raises, is a problem of
the row; a tokenizer without a chat template is an error naming the file and the keys that fix it.
Used by trainables/data.py; tested by `python -m pytest tests/test_data.py -q`.
"""

from __future__ import annotations

import os

from trainables.data_sources import InvalidDataError, RowReader, non_blank


class ChatRenderer:
    """Renders message lists to text with a tokenizer's chat template (prompt / answer split)."""

    def __init__(self, tokenizer, source: str, where: str = "",
                 as_text: str = "data.layout: explicit (prompt, chosen, rejected as strings)"):
        """where: the first row that needs the template, e.g. "row 0 (line 1)", and as_text: the text layout
        to convert to, for the error when the tokenizer has no template."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            given = ("no tokenizer was given (chat_template_tokenizer=None)" if tokenizer is None
                     else "the tokenizer has no chat_template")
            first = f", first at {where}" if where else ""
            raise InvalidDataError(
                source, [], f"conversational rows (lists of {{role, content}} messages{first}) are rendered to text "
                f"with the tokenizer's chat template, and {given}",
                "set model.tokenizer_path to a tokenizer that has a chat template (e.g. the chat/instruct variant of "
                f"the model), or render the conversations to text yourself and use {as_text}",
            )
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token or ""

    def render(self, prompt_messages: list[dict], answers: list[list[dict]]) -> tuple[str, list[str]]:
        """(prompt text, answer texts); raises ValueError with the reason when the template misbehaves."""
        try:
            prompt = self.tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
            fulls = [self.tokenizer.apply_chat_template(prompt_messages + answer, tokenize=False) for answer in answers]
        except Exception as error:  # jinja raises TemplateError and friends from inside the template
            raise ValueError(f"chat template failed: {type(error).__name__}: {error}") from error
        texts = []
        for full in fulls:
            if not full.startswith(prompt):
                cut = len(os.path.commonprefix([prompt, full]))
                raise ValueError(
                    "chat template: the prompt rendered with add_generation_prompt=True is not a prefix of the "
                    f"rendered conversation (they differ at character {cut}: {prompt[cut:cut + 30]!r} vs "
                    f"{full[cut:cut + 30]!r}), so the answer cannot be cut out; use a template whose generation "
                    "prompt matches how it renders assistant turns, or pre-render the data to the explicit layout"
                )
            answer = full[len(prompt):]
            if self.eos and answer.rstrip().endswith(self.eos):
                answer = answer.rstrip()[: -len(self.eos)]  # the tokenizer step appends eos itself
            texts.append(answer)
        return prompt, texts


def same_messages(messages_a: list[dict], messages_b: list[dict]) -> bool:
    return [(m["role"], m["content"]) for m in messages_a] == [(m["role"], m["content"]) for m in messages_b]


def shared_message_count(first: list[dict], second: list[dict]) -> int:
    count = 0
    while count < min(len(first), len(second)) and same_messages(first[count : count + 1], second[count : count + 1]):
        count += 1
    return count


def render_answers(
    row: RowReader, renderer: ChatRenderer, prompt_messages: list[dict], answers: dict[str, list[dict]]
) -> tuple[str, list[str]] | None:
    """Check the answer messages, then render prompt and answers; None (with problems flagged) if invalid."""
    for field, messages in answers.items():
        if not messages:
            row.flag(field, "empty: no answer messages after the prompt messages")
        elif not "".join(m["content"] for m in messages).strip():
            row.flag(field, "whitespace-only: the answer messages have no visible characters")
    if row.problems:
        return None
    try:
        prompt, texts = renderer.render(prompt_messages, list(answers.values()))
    except ValueError as error:
        row.flag(next(iter(answers)), str(error))
        return None
    if not prompt.strip():
        row.flag("prompt", "empty: the chat template rendered the prompt as empty text")
    for field, text in zip(answers, texts):
        non_blank(row, field, text)
    return None if row.problems else (prompt, texts)
