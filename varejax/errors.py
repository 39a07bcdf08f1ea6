"""The one base class of errors a user can fix (a bad file, config or argument).

The `varejax` command prints a `UserError` as one line `error: <message>` and exits with status 2;
any other exception is a bug and keeps its traceback. Raise a subclass (or `UserError` itself) only
where the message tells the user what to change.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (files, configs, arguments); its message says what to change."""


class ConfigError(UserError, ValueError):
    """A bad config file, config value or `--config.x=y` override (also a ValueError, as it was)."""
