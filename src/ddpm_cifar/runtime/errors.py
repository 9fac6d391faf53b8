"""Errors that the stage entry points turn into one-line messages instead of tracebacks."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a value): the message says what and how to fix it."""


class ConfigError(UserError):
    """A params.yaml section with a missing, unknown or mistyped key."""
