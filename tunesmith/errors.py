"""User-facing errors.

Contract: anything the user got wrong (a config key, a data line, a model path, an argument)
raises `UserError` with one line that names the file and line (or the key) and says what was
expected. Library code speaks in config keys (`train.output_dir`) and its own argument names
(`out_path`, `force=True`), given as `key=`; the CLI renames those to its flags (`--out`,
`--force`) with `speaking(names)` before printing the line, exiting with code 2 and showing no
traceback. Code never raises `UserError` for its own bugs: those stay ordinary exceptions.
An `OSError` the machine caused (disk full, a read-only or unwritable path) is an environment
fault: `environment_fault(err)` gives its one line (path and cause), which the CLI prints with
exit code 1, as it does for an `EnvironmentFault` (found before any work: a read-only output).
`Diverged` is a training run stopped on a non-finite or collapsed loss: one line, exit code 3.
"""

from __future__ import annotations

import errno
import re

# errno → what the user reads: faults of the machine, not of tunesmith or its input
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied (read-only?)",
    errno.EPERM: "operation not permitted (read-only?)",
    errno.EIO: "input/output error from the disk",
}


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


class EnvironmentFault(UserError):
    """The machine, not the input: an output path that cannot be written. The CLI exits with 1."""


def where(path, line: int | None = None) -> str:
    """Format a location as `file:line` (or just `file`) for error messages."""
    return f"{path}:{line}" if line is not None else str(path)


# writers that turn an OSError into their own exception (torch.save, safetensors) keep its text
FAULT_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "StorageFull": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
}


def environment_fault(err: BaseException, where_: str | None = None) -> str | None:
    """`PATH: cause (ERRNO)` for an error the machine caused (an OSError, or a writer's exception
    that carries one's text; `where_` names the path when the error does not), else None."""
    code = err.errno if isinstance(err, OSError) else None
    if code not in ENVIRONMENT_ERRNOS:
        code = next((c for text, c in FAULT_TEXTS.items() if text in str(err)), None)
        if code is None:
            return None
    path = getattr(err, "filename", None) or where_ or "a file"
    return f"{path}: {ENVIRONMENT_ERRNOS[code]} ({errno.errorcode[code]})"
