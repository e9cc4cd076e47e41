"""The driver's user errors. All derive from trainables.errors.UserError, which carries the exit code
(2) and which `dpo`'s `main` catches once: the message is printed as is, with no traceback.

A message says what was wrong, where (the file, row, field or config key) and how to fix it, in the
user's terms; it never starts with a source path.
"""

from __future__ import annotations

from trainables.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file and every bad key."""


class TrackingError(UserError):
    """A tracking setting that cannot work, or a tracking server that cannot be reached or started."""


class TrackingConfigError(TrackingError, ValueError):
    """A tracking setting that cannot work (e.g. the embedded server with an object-store storage_path)."""


class TrackingUnavailableError(TrackingError, RuntimeError):
    """The tracking server cannot be reached or started; the message names the URI and how to fix it."""


class NotFoundError(UserError, LookupError):
    """A sweep, trial, run or checkpoint the user named does not exist where they said it is."""


class ExportError(UserError):
    """A trial that cannot be exported: no complete checkpoint, an unreadable one, no eligible trial."""


__all__ = ["UserError", "ConfigError", "TrackingError", "TrackingConfigError", "TrackingUnavailableError",
           "NotFoundError", "ExportError"]
