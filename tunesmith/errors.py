"""User-facing errors.

Contract: anything the user got wrong (a config key, a data line, a model path, a flag)
raises `UserError` with one line that names the file and line (or the key) and says what
was expected. The CLI prints that line, exits with code 2 and shows no traceback. Code
never raises `UserError` for its own bugs: those stay ordinary exceptions.
"""


class UserError(Exception):
    """A problem with what the user gave us; `str(err)` is the one line shown."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split("\n")))


def where(path, line: int | None = None) -> str:
    """Format a location as `file:line` (or just `file`) for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
