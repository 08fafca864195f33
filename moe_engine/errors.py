"""What a user can get wrong, as one exception family.

Every problem a user can cause (a bad setting, a missing or malformed input, a checkpoint from
another run, a diverged run) is raised as a :class:`UserError` whose message alone says what is
wrong, where (file, key, value) and what to do. ``moe-lab`` prints that message and exits with
code 2, without a traceback; anything else is a bug and keeps its traceback (exit 1). The Prefect
tasks never retry an exit-2 stage: running it again cannot help.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, settings or files; the message is for the user."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError, ValueError):
    """A params section, ``--set`` item or argument is invalid (unknown key, wrong type, out of range)."""


class InputError(UserError, FileNotFoundError):
    """An input path is missing, unreadable, or not what the command expects."""
