"""Fetching a file pinned by its digest: retries with exponential backoff, a digest check, an atomic
write, and a valid existing file kept without network access. When no source can be reached the
error names the asset, what was tried and how to provide it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pooch
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from cvpipe.errors import UserError
from cvpipe.io import ChecksumError, file_hash
from cvpipe.params import DownloadParams

log = logging.getLogger(__name__)


class AssetUnavailable(UserError, RuntimeError):
    """No source of an asset could be reached or verified."""

    fold = False  # the message lists each source tried, one per line

    def __init__(self, asset: str, tried: list[str], hint: str, cause: BaseException | None = None):
        self.asset, self.tried = asset, tried
        lines = [f"cannot obtain {asset}.", "Sources tried:"]
        lines += [f"  - {t}" for t in tried]
        if cause is not None:
            lines.append(f"Last error: {type(cause).__name__}: {cause}")
        lines.append(f"How to provide it: {hint}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Remote:
    """A file at a URL with a pinned digest: ``algo`` is "sha256" or "md5".

    ``prefix=True`` means only the start of the sha256 is known (torchvision names
    its weight files ``<arch>-<sha256 prefix>.pth``).
    """

    url: str
    digest: str
    algo: str = "sha256"
    prefix: bool = False

    def matches(self, path: Path) -> bool:
        actual = file_hash(path, self.algo)
        return actual.startswith(self.digest) if self.prefix else actual == self.digest


def fetch(remote: Remote, dest: Path, asset: str, dp: DownloadParams, hint: str) -> Path:
    """Download ``remote`` to ``dest`` with retries and exponential backoff (tenacity).

    The file is verified against its pinned digest; a valid existing file is kept
    without network access. pooch streams into a temporary file and renames it
    when complete; a file that then fails its digest is removed, so nothing
    unverified stays at ``dest``.

    Raises:
        AssetUnavailable: every attempt failed, or the source served a file with
            another digest (the message says how to provide the file).
    """
    if dest.is_file():
        if remote.matches(dest):
            log.info("%s: %s already present and valid", asset, dest)
            return dest
        log.warning("%s: %s exists but fails its %s check; downloading again", asset, dest, remote.algo)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    known = None if remote.prefix else f"{remote.algo}:{remote.digest}"
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=dp.timeout_s)

    def attempt() -> None:
        try:
            pooch.retrieve(remote.url, known_hash=known, fname=dest.name, path=dest.parent, downloader=downloader)
        except ValueError as err:  # pooch: digest mismatch, the source serves another file: not retried
            raise AssetUnavailable(asset, [remote.url], hint, ChecksumError(str(err))) from err

    def failed(state: RetryCallState) -> None:
        log.warning("%s: attempt %d/%d failed: %s", asset, state.attempt_number, dp.retries, state.outcome.exception())

    # Connection errors, timeouts and HTTP errors are retried, waiting backoff_s, 2 x backoff_s, ...
    retrying = Retrying(stop=stop_after_attempt(dp.retries), wait=wait_exponential(multiplier=dp.backoff_s, min=0),
                        retry=retry_if_not_exception_type(AssetUnavailable), after=failed, reraise=True)
    try:
        retrying(attempt)
    except AssetUnavailable:
        raise
    except Exception as err:
        raise AssetUnavailable(asset, [remote.url], hint, err) from err
    if not remote.matches(dest):
        actual = file_hash(dest, remote.algo)
        dest.unlink()
        raise AssetUnavailable(asset, [remote.url], hint, ChecksumError(
            f"{remote.algo} {actual} does not match the pinned {remote.digest}"))
    return dest
