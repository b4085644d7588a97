"""The error every reader of the package's own files raises when a file cannot be read."""

from __future__ import annotations

import os


class UnreadableFileError(ValueError):
    """A file the package reads is truncated, corrupt or not the kind of file expected.

    The message names the path, what is wrong with it and what to do; `path` holds the path.
    A ValueError, so code that caught the readers' ValueErrors keeps working.
    """

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        if self.path not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)


class CheckpointError(UnreadableFileError):
    """A weights file (`.pth`/`.pt`, `.safetensors`, `.npz`) that cannot be read or is refused."""
