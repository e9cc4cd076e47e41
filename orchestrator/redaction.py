"""Secrets never shown: redaction of values, texts and log records, bounded excerpts of bad values, and
private files.

A secret is a value under a key named like one (hf_token, password, api_key, aws_secret_access_key, ...),
a password or token inside a URI (`https://alice:***@host`, `https://***@host`, `?token=***`), a known
token format (hf_..., sk-..., ghp_..., AKIA...), an `Authorization: Bearer ...` value, or the value of an
environment variable named like a secret (MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...). `redact` replaces
them by `***`; `dpo`'s `main` passes every message it prints through it and installs
`install_log_redaction` so that log records are redacted too (their arguments and tracebacks included).
`excerpt` shows at most ~80 characters of a bad value in an error message, whatever its size.
`write_private_text` writes a file (e.g. a run's config.yaml) redacted, readable by its owner only
(mode 0600), never through a symlink. Pure Python; imports no torch or mlflow.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REDACTED = "***"
EXCERPT_CHARS = 80  # the most of a bad value an error message shows
SECRET_WORDS = {"token", "password", "passwd", "pwd", "secret", "credential", "credentials", "apikey"}
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
URI_PASSWORD = re.compile(r"(?P<head>(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^@\s/]+)(?=@)", re.I)
URI_USER_TOKEN = re.compile(r"(?P<head>(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://)(?P<user>[^/\s:@]+)(?=@)", re.I)  # token as the user
QUERY_SECRET = re.compile(r"(?P<head>[?&;](?P<key>[A-Za-z0-9_.-]+)=)(?P<value>[^&;#\s]+)")
KEY_VALUE = re.compile(r"""(?P<head>(?:(?P<quote>['"])(?P<qkey>[A-Za-z][A-Za-z0-9_.-]*)(?P=quote)[ \t]*[:=]|"""
                       r"""\b(?P<key>[A-Za-z][A-Za-z0-9_.-]*)=)[ \t]*['"]?)(?P<value>[^'"\s&;,#}\]=]+)""")
# password=...; "api_key": "..."; 'hf_token': '...' (an unquoted `key: text` is left alone: messages name keys so)
AUTH_HEADER = re.compile(r"(?P<head>\bbearer\s+|\bauthorization[\"']?\s*[:=]\s*[\"']?(?:[a-z]+\s+)?)[A-Za-z0-9+/=._~-]{6,}", re.I)
TOKEN_LIKE = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b")
MIN_ENV_SECRET_CHARS = 6  # shorter values of secret-named variables are not searched for in texts
NOT_SECRET_VARIABLES = {"PWD", "OLDPWD"}  # the shell's working directories, not passwords
_TEXT_SCAN_CHARS = 20_000  # an excerpt redacts at most this much of a long string before cutting it


def is_secret_key(key: str) -> bool:
    """hf_token, password, db_passwd, client_secret, api_key, apiKey, aws_secret_access_key: yes; tokenizer_path, max_tokens: no."""
    last = re.sub(r"([a-z])([A-Z])", r"\1_\2", str(key).rsplit(".", 1)[-1]).lower()
    words = [word for word in re.split(r"[_\-\s]+", last) if word]
    return bool(SECRET_WORDS & set(words)) or any(pair in SECRET_PAIRS for pair in zip(words, words[1:]))


def _query_secret(match: re.Match) -> str:
    key = match.group("key").lower()
    if is_secret_key(key) or key.endswith(("token", "signature", "sig", "key")):
        return match.group("head") + REDACTED
    return match.group(0)


def _key_value_secret(match: re.Match) -> str:
    key = match.group("key") or match.group("qkey")
    if match.group("value") != REDACTED and is_secret_key(key) and "://" not in match.group("value"):
        return match.group("head") + REDACTED
    return match.group(0)


def _environment() -> dict[str, str]:
    """A copy of os.environ. Another thread (MLflow's telemetry) may add or delete a variable while it is read,
    which makes the read raise KeyError or RuntimeError (a `dpo sweep --resume` crashed so): read again."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def environment_secrets() -> list[str]:
    """Values of environment variables named like secrets (longest first), to be cut out of any text."""
    values = {value for name, value in _environment().items()
              if len(value) >= MIN_ENV_SECRET_CHARS and name not in NOT_SECRET_VARIABLES and is_secret_key(name)}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """A string with every secret inside it replaced by `***`."""
    for secret in environment_secrets():
        text = text.replace(secret, REDACTED)
    text = URI_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = URI_USER_TOKEN.sub(lambda m: m.group("head") + REDACTED, text)
    text = QUERY_SECRET.sub(_query_secret, text)
    text = KEY_VALUE.sub(_key_value_secret, text)
    text = AUTH_HEADER.sub(lambda m: m.group("head") + REDACTED, text)
    return TOKEN_LIKE.sub(REDACTED, text)


def redact(value: Any, key: str | None = None) -> Any:
    """`***` for a secret-looking key; inside strings, URI passwords, query tokens and known token formats."""
    if key is not None and is_secret_key(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


# ---- excerpts of bad values ------------------------------------------------------------------

def _short(value: Any, budget: int, depth: int = 0) -> str:
    """A repr of at most about `budget` characters, built without ever formatting the whole value."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        if value.bit_length() > 200:
            return f"<a whole number of {int(value.bit_length() * 0.30103) + 1} digits>"
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(redact_text(value[:_TEXT_SCAN_CHARS])[: budget + 1])
    if isinstance(value, Mapping):
        if depth >= 2:
            return "{...}"
        parts = []
        for count, (k, v) in enumerate(value.items()):
            if count >= 4 or sum(map(len, parts)) > budget:
                parts.append("...")
                break
            shown = repr(REDACTED) if is_secret_key(str(k)) and v not in (None, "", False) else _short(v, budget // 2, depth + 1)
            parts.append(f"{_short(k, 40, depth + 1)}: {shown}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        if depth >= 2:
            return "[...]"
        parts = []
        for count, item in enumerate(value):
            if count >= 6 or sum(map(len, parts)) > budget:
                parts.append("...")
                break
            parts.append(_short(item, budget // 2, depth + 1))
        return "[" + ", ".join(parts) + "]"
    try:
        return redact_text(repr(value)[:_TEXT_SCAN_CHARS])
    except Exception:  # noqa: BLE001 - a value whose repr fails is shown by its kind
        return f"<{type(value).__name__}>"


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A bad value as an error message shows it: its repr, secrets redacted, cut to `limit` characters."""
    text = _short(value, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def excerpt_text(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A piece of the user's text (e.g. a `--set` argument) unquoted, secrets redacted, cut to `limit`."""
    text = redact_text(str(text)[:_TEXT_SCAN_CHARS])
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- logs, tracebacks and files --------------------------------------------------------------

class RedactingFilter(logging.Filter):
    """Redacts a record's message (its arguments merged in first) and its traceback text, in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_dpo_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - an unformattable record is shown as its template
            message = str(record.msg)
        redacted = redact_text(message)
        if redacted != message:  # else msg and args stay as they were (formatters may read args)
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        record._dpo_redacted = True
        return True


_FILTER = RedactingFilter()
_FACTORY_INSTALLED = False


def install_log_redaction() -> None:
    """Every log record is redacted: a filter on the root logger's handlers and on every handler of a named
    logger known now, and a record factory for loggers (and handlers) created later. Safe to call again."""
    global _FACTORY_INSTALLED
    loggers = [logging.getLogger()] + [item for item in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(item, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    if not _FACTORY_INSTALLED:
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _FILTER.filter(record)
            return record

        logging.setLogRecordFactory(factory)
        _FACTORY_INSTALLED = True


def redacted_traceback(error: BaseException) -> str:
    """The full traceback of `error` (a bug: it is shown), with every secret in it redacted."""
    return redact_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))


def write_private_text(path: str | Path, text: str) -> Path:
    """Write `text`, secrets redacted, to `path` with mode 0600 (owner only); an existing file is replaced in
    place (its mode set to 0600), a symlink at `path` is refused (OSError), never followed."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            descriptor = -1
            handle.write(redact_text(text))
    finally:
        if descriptor != -1:
            os.close(descriptor)
    return path
