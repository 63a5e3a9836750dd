"""The error types a user can fix: the command line prints them as one line and exits with their code."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code `exit_code`, never a traceback."""

    exit_code = 1


class UsageError(UserError):
    """A wrong command line, option or config value."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key with a wrong name, type or value."""
