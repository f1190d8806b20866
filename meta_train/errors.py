"""Errors that the CLI reports as one line (the user's input is wrong, not the program)."""


class UsageError(ValueError):
    """Bad configuration, an unknown name, missing data: printed without a traceback."""


def os_error_line(error: OSError) -> str:
    """An ``OSError`` as one line that names the file: ``Permission denied: /a/b``."""
    text = error.strerror or str(error)
    return f"{text}: {error.filename}" if error.filename else text
