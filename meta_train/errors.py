"""Errors that the CLI reports as one line (the user's input is wrong, not the program)."""


class UsageError(ValueError):
    """Bad configuration, an unknown name, missing data: printed without a traceback."""
