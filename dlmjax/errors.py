"""Whose mistake is it? The error taxonomy of dlmjax.

A `DlmjaxError` is the user's: a flag, a config field, a file or an input that is wrong. Its message names the
thing in the user's own terms (`--gen-length`, `data.seq_len`, the file's path), the value, and what is allowed.
The command line prints it as one line and exits with status 2, before any work is done.

Anything else that escapes (a `TypeError`, an `IndexError`, a bare `ValueError` from deep inside JAX) is ours: a
bug, and it keeps its traceback.

The subclasses say which part of a run the input belongs to. Each is also a `ValueError` (the input has the right
type but a wrong value), except the checkpoint errors, which are about files on disk.
"""
from __future__ import annotations

import re


class DlmjaxError(Exception):
    """A user error: the message says what was given, where, and what is allowed.

    `field`, when set, is the setting the message is about in the library's words (`gen_length`), so that a front
    end can name it in its own (`--gen-length`).
    """

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConfigError(DlmjaxError, ValueError):
    """A run configuration value is unknown, of the wrong type, or inconsistent with another value."""


class SettingsError(DlmjaxError, ValueError):
    """A sampler setting or a sampling request (prompt, lengths, token ids) is not allowed.

    A message that starts `SamplerSettings.gen_length=...` names its field; `field` defaults to that name.
    """

    def __init__(self, message: str = "", *, field: str | None = None):
        if field is None:
            named = re.match(r"\w+\.(\w+)=", message)
            field = named.group(1) if named else None
        super().__init__(message, field=field)


class InputError(DlmjaxError, ValueError):
    """Data given to a command (token ids, an array file, a text) is not what the command reads."""


class InterchangeError(DlmjaxError, ValueError):
    """A Hugging Face checkpoint or its config.json cannot be mapped: a missing or unexpected tensor, a shape that
    does not fit the config, an unsupported config value, non-finite weights, an unknown --arch."""


class DistributedError(DlmjaxError, ValueError):
    """A multi-process job is half configured: the message names the environment variables."""


class CheckpointError(DlmjaxError):
    """A checkpoint directory cannot be used as asked: missing, incomplete, refused, locked or not writable."""


class CheckpointRestoreError(CheckpointError, RuntimeError):
    """No checkpoint step (or params export) in a directory could be restored."""


class WorkdirLockedError(CheckpointError):
    """Another trainer holds the run directory."""


__all__ = ["CheckpointError", "CheckpointRestoreError", "ConfigError", "DistributedError", "DlmjaxError",
           "InputError", "InterchangeError", "SettingsError", "WorkdirLockedError"]
