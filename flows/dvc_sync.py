"""Keep Prefect-run stages and DVC in agreement about what is stale.

Before a stage runs, DVC is asked whether it is up to date (the same check as
`dvc status`); after it ran, its outputs are committed to dvc.lock (as
`dvc commit` does), so `cvpipe run` followed by `dvc repro` is a no-op and the
other way round. In a pipeline run the commits happen in the background, in
order, beside the next stages. Where the user configured DVC's cache links, a commit
replaces each cached output in the workspace by a link to its cache entry, so a stage
waits for its upstream stages' commits before it starts (:func:`wait_for_commits`).
The run waits for every commit before it ends.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cvpipe.errors import UserError

log = logging.getLogger(__name__)

# DVC's own repo lock is per process-file; threads of one pipeline run take turns here first.
_LOCK = threading.Lock()


class DvcLockBusy(UserError, RuntimeError):
    """Another DVC process (a `dvc repro`, another pipeline run) holds the repository lock."""

    fold = False


class DvcSync:
    """Stage staleness and lock-file updates for the DVC project at ``root`` (or nothing, outside one)."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root).resolve()
        self.enabled = (self.root / "dvc.yaml").is_file() and (self.root / ".dvc").is_dir()

    def _repo(self):
        from dvc.repo import Repo

        return Repo(str(self.root))

    def _guard(self, fn):
        from dvc.lock import LockError

        with _LOCK:
            try:
                return fn()
            except LockError as err:
                raise DvcLockBusy(
                    f"the DVC repository {self.root} is locked by another process ({err}); "
                    "wait for the other `dvc repro` / `cvpipe run` to finish, then run again"
                ) from None

    def stale(self, stage: str) -> dict:
        """DVC's status for one stage: {} when up to date, else what changed. Always stale outside DVC.

        A stage that dvc.lock does not record has never run (a fresh clone): DVC would report it
        changed, after opening the repository and hashing its dependencies (up to half a second
        a stage), so it is not asked. A frozen stage is always left to DVC.
        """
        if not self.enabled:
            return {stage: ["not a DVC project"]}
        if self._never_ran(stage):
            return {stage: ["not in dvc.lock"]}

        def check():
            with self._repo() as repo:
                return repo.status(targets=[stage])

        return self._guard(check)

    def _never_ran(self, stage: str) -> bool:
        """dvc.lock has no entry for ``stage`` and dvc.yaml does not freeze it (False when unsure)."""
        import yaml

        # libyaml's safe loader where PyYAML has it: this runs beside other threads of the pipeline,
        # and a pure-Python parse there waits for the interpreter many times over
        try:
            lock = self.root / "dvc.lock"
            locked = (yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                      if lock.is_file() else {})
            spec = yaml.load((self.root / "dvc.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            entry = spec["stages"][stage.partition("@")[0]]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return False
        if not isinstance(locked, dict) or not isinstance(entry, dict) or entry.get("frozen"):
            return False
        return stage not in (locked.get("stages") or {})

    def relinks(self) -> bool:
        """Whether a commit re-creates the workspace outputs from the cache, as `dvc commit` does.

        Not with DVC's default cache types (reflink, else copy) or an explicit ``cache.type copy``:
        there the relink writes each output again as a copy of the same bytes (or a reflink, on
        the few filesystems that have them), so the commit is `dvc commit --no-relink` and leaves
        the files as the stage wrote them. With any other configured ``cache.type`` (hardlink,
        symlink, reflink) the outputs are relinked, as DVC does. True when the config is unreadable.
        """
        if not self.enabled:
            return False
        from dvc.config import Config, ConfigError

        try:
            types = Config(dvc_dir=str(self.root / ".dvc"))["cache"].get("type")
        except (ConfigError, OSError):
            return True
        return bool(types) and set(types) != {"copy"}

    def commit(self, stage: str, relink: bool = True) -> None:
        """Record the stage's current deps, params and outs in dvc.lock and the DVC cache; with
        ``relink``, replace the cached outputs in the workspace by their cache entries' links."""
        if not self.enabled:
            return

        def commit():
            with self._repo() as repo:
                stages = repo.commit(stage, force=True, relink=relink)
                # As `dvc repro` does: cached outputs are listed in .gitignore.
                with repo.scm_context(quiet=True):
                    for st in stages:
                        for out in st.outs:
                            out.ignore()

        self._guard(commit)

    def commit_soon(self, stage: str) -> None:
        """:meth:`commit` in the background, in the order asked (one at a time); the run's end calls
        :func:`wait_commits`. A stage that reads this one's outputs calls :func:`wait_for_commits`
        first, which waits for the commit only when it relinks the outputs (:meth:`relinks`)."""
        global _committer
        relink = self.relinks()
        with _PENDING_LOCK:
            if _committer is None:
                _committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cvpipe-dvc-commit")
            _pending.append((stage, _committer.submit(self.commit, stage, relink), relink))


_committer: ThreadPoolExecutor | None = None
_pending: list[tuple[str, Future, bool]] = []  # stage, commit, relinks
_PENDING_LOCK = threading.Lock()


class UpstreamNotRecorded(UserError, RuntimeError):
    """DVC's commit of an upstream stage failed, so its outputs may be missing from the workspace."""


def wait_for_commits(stages) -> None:
    """Wait for the background commits asked for ``stages`` that relink their outputs (not for others).

    Raises:
        UpstreamNotRecorded: one of them failed (the error names the stage and DVC's message).
    """
    wanted = set(stages)
    with _PENDING_LOCK:
        pending = [(s, fut) for s, fut, relink in _pending if relink and s in wanted]
    for stage, fut in pending:
        err = fut.exception()
        if err is not None:
            raise UpstreamNotRecorded(f"DVC could not commit the upstream stage {stage} ({err}); "
                                      "its outputs may be missing: run it again") from err


def wait_commits() -> list[tuple[str, BaseException]]:
    """Wait for every :meth:`DvcSync.commit_soon` asked so far; returns (stage, error) of those that failed."""
    with _PENDING_LOCK:
        pending = list(_pending)
        _pending.clear()
    failed = []
    for stage, fut, _ in pending:
        err = fut.exception()
        if err is not None:
            failed.append((stage, err))
    return failed
