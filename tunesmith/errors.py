"""User-facing errors.

Contract: anything the user got wrong (a config key, a data line, a model path, an argument)
raises `UserError` with one line that names the file and line (or the key) and says what was
expected. Library code speaks in config keys (`train.output_dir`) and its own argument names
(`out_path`, `force=True`), given as `key=`; the CLI renames those to its flags (`--out`,
`--force`) with `speaking(names)` before printing the line, exiting with code 2 and showing no
traceback. Code never raises `UserError` for its own bugs: those stay ordinary exceptions.
`Diverged` is a training run stopped on a non-finite or collapsed loss: one line, exit code 3.
"""

from __future__ import annotations

import re


class Diverged(Exception):
    """A training run stopped because it diverged (`train.divergence`): one line, exit code 3."""

    exit_code = 3


class UserError(Exception):
    """A problem with what the user gave us; `str(err)` is the one line shown."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        self.detail = " ".join(message.split("\n"))
        super().__init__(self.detail if key is None else f"{key}: {self.detail}")

    def speaking(self, names: dict[str, str]) -> UserError:
        """The same error with library names replaced as `names` says: the key, and `name=value`
        hints in the message (`{"out_path": "--out", "force=True": "--force"}`)."""
        detail = self.detail
        for name, flag in names.items():
            if "=" in name:
                detail = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, detail)
        return UserError(detail, names.get(self.key, self.key))


def where(path, line: int | None = None) -> str:
    """Format a location as `file:line` (or just `file`) for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
