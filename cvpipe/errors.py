"""Errors the user can act on, printed as one ``error: ...`` line instead of a traceback."""

from __future__ import annotations

import errno

#: How many problems of an invalid params file are listed on the one line.
MAX_PROBLEMS = 4


class UserError(Exception):
    """An error whose message says what is wrong and what to do (wrong input, busy project,
    missing hardware); the command line prints it as one line.

    Subclasses live in the layer that raises them (a download that found no source, a busy DVC
    lock...), so this module needs to know none of them.
    """

    #: Fold a multi-line message (a header and indented items) into one line; False prints it as is.
    fold: bool = True


def one_line(text: str, max_items: int = MAX_PROBLEMS) -> str:
    """Fold a message of a header and indented items ("invalid parameters in X:\\n  a: ...") into one line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, items = lines[0], lines[1:]
    more = len(items) - max_items
    shown = items[:max_items] + ([f"and {more} more"] if more > 0 else [])
    return f"{head.rstrip(':')}: {'; '.join(shown)}"


def _disk_full(err: BaseException) -> str | None:
    """The one line for a full disk (ENOSPC / EDQUOT anywhere in the exception's chain)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "disk full" if e.errno == errno.ENOSPC else "disk quota exceeded"
            where = e.filename or "output files"
            return f"error: {what} while writing {where}: free space and run again"
        if "database or disk is full" in str(e):  # SQLite (the MLflow store) says it this way
            return "error: disk full while writing the MLflow tracking store: free space and run again"
        e = e.__cause__ or e.__context__
    return None


def _pickled(err: BaseException) -> str | None:
    import pickle

    if not isinstance(err, pickle.UnpicklingError):
        return None
    return f"error: {pickled_message(err)}"


def pickled_message(err: BaseException) -> str:
    """What to say of a file refused by ``torch.load(weights_only=True)``, without torch's advice
    to load it unsafely."""
    skip = ("weights only load failed", "please file an issue", "check the documentation", "in pytorch 2.6")
    reasons = [ln.replace("WeightsUnpickler error:", "").strip() for ln in str(err).splitlines()]
    reasons = [r for r in reasons if r and not r.lower().startswith(skip) and "weights_only" not in r]
    reason = f" ({reasons[0][:160]})" if reasons else ""
    return ("a weights file holds pickled Python objects, not a plain state dict, and was refused"
            f"{reason}; use a state dict saved with torch.save(model.state_dict(), path)")


def user_facing(err: BaseException) -> str | None:
    """The message to print for errors with a clear remedy; None for real bugs (shown as tracebacks)."""
    from cvpipe.io import ChecksumError, CorruptFile
    from cvpipe.params import ParamsError

    if isinstance(err, UserError):  # its own message says it best (a full disk included)
        return f"error: {one_line(str(err)) if err.fold else err}"
    full = _disk_full(err)
    if full is not None:
        return full
    if isinstance(err, (ParamsError, CorruptFile)):
        return f"error: {one_line(str(err))}"
    if isinstance(err, (ChecksumError, FileNotFoundError)):
        return f"error: {err}"
    return _pickled(err)
