"""Errors the user can act on, printed as a message instead of a traceback."""

from __future__ import annotations


def user_facing(err: BaseException) -> str | None:
    """The message to print for errors with a clear remedy; None for real bugs (shown as tracebacks)."""
    from cvpipe.dvc_sync import DvcLockBusy
    from cvpipe.io import ChecksumError, CorruptFile
    from cvpipe.params import ParamsError
    from tasks.download import AssetUnavailable

    if isinstance(err, (AssetUnavailable, ChecksumError, CorruptFile, DvcLockBusy, ParamsError,
                        FileNotFoundError)):
        return f"error: {err}"
    return None
