"""Decision rows kept on local disk while the database cannot take them, so an outage costs neither memory nor rows.

The decision writer queues rows in memory and stores them in batches. While the database is away it waits; once
the backlog passes a bound, or the process shuts down, it moves the rows here instead (JSON lines, fsync'd), and
stores them when the database is back or, failing that, at the next start of any API process on the same
directory. Rows the database refuses for their own sake (not an outage) go to a ``rejected-*`` file an operator can
inspect; they are never retried automatically.

Ownership is a kernel file lock, never a process id. Each spool, once used, holds an exclusive ``flock`` on its own
``owner-<token>.lock`` in the directory for as long as it lives (:meth:`DecisionSpool.close` gives it up; the
kernel drops it when the process dies, even by SIGKILL). ``pending-<token>.jsonl`` are its rows waiting to be
stored, ``replaying-<token>-<n>.jsonl`` the files it is storing. The token starts with the writing process id, for
people reading the directory; nothing is decided on it. A file is another spool's to leave alone while that
spool's owner lock is held; once the lock can be taken (the owner closed or died), its files are any spool's to
claim, and its lock file is removed. A spool claims a file by renaming it to one of its own names (atomic on one
file system), so two spools never store the same file; a ``replaying`` file whose owner is gone (it died
mid-replay) is claimed again. Storing is idempotent by ``decision_id``, so a replay that is interrupted and resumed
stores nothing twice.

The locks are ``flock`` locks, which belong to an open file description, not to a process: two spools in one
process are two owners, a probe opening and closing an owner's lock file does not release it, and this holds
across containers sharing a bind-mounted directory. (``fcntl``/``lockf`` record locks do none of that.) A network
file system may emulate ``flock`` with record locks: keep the spool on a local or bind-mounted disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("winback.api")

_PENDING, _REPLAYING, _REJECTED, _OWNER = "pending", "replaying", "rejected", "owner"

#: Every spool of this process, so a forked child can drop the owner locks it inherited (see ``_before_fork``).
_SPOOLS: weakref.WeakSet[DecisionSpool] = weakref.WeakSet()


class DecisionSpool:
    """An append-only journal of decision rows in ``directory`` (created on first use); thread-safe.

    ``datetime_columns`` are written as ISO 8601 and read back as datetimes; every other value must be JSON.
    The spool owns its files from its first write, claim or :meth:`check_writable` until :meth:`close`.
    """

    def __init__(self, directory: str | Path, datetime_columns: tuple[str, ...]) -> None:
        self.directory = Path(directory)
        self.datetime_columns = datetime_columns
        self._token = _new_token()
        self._owner_fd: int | None = None  # the open file description holding this spool's owner lock
        self._lock = threading.Lock()
        self._spooled = 0  # rows appended to this spool's pending file since it was last claimed
        _SPOOLS.add(self)

    @property
    def pending_path(self) -> Path:
        """This spool's file of rows waiting to be stored."""
        return self._file(_PENDING)

    @property
    def rejected_path(self) -> Path:
        """This spool's file of rows the database refused."""
        return self._file(_REJECTED)

    def _file(self, kind: str) -> Path:
        return self.directory / f"{kind}-{self._token}.jsonl"

    @property
    def owner_lock_path(self) -> Path:
        """The lock file this spool holds locked while it owns its files."""
        return _owner_lock(self.directory, self._token)

    @property
    def holds_rows(self) -> bool:
        """Whether this spool appended rows it has not claimed back yet."""
        return self._spooled > 0

    def check_writable(self) -> None:
        """Create the directory, write and remove a probe file there and take this spool's owner lock: a spool that
        cannot be written is found at start, not in the middle of an outage. OSError naming the directory
        otherwise."""
        probe = self.directory / f".probe-{self._token}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
            with self._lock:
                self._own()
        except OSError as error:
            raise OSError(
                f"the decision spool directory {self.directory} (WINBACK_SPOOL_DIR) cannot be written: {error}"
            ) from error

    def _own(self) -> None:
        """Take an owner lock if this spool holds none, or holds one whose lock file is gone (the caller holds
        ``_lock``).

        The lock file is created under a fresh token: files written under an earlier token of this spool (before a
        :meth:`close`) are nobody's now, and stay so. A claimer may be probing the new file in the instant between
        its creation and the lock (it then removes it as stale): the lock is kept only when the name still leads to
        the locked file, and otherwise taken again under another token. A lock whose file was removed under it (the
        directory deleted and made again) guards nothing: a file written beside no lock file is any claimer's, so
        it is given up and a new one taken, in a directory made again if need be.
        """
        if self._owner_fd is not None:
            if _names(self._owner_fd, self.owner_lock_path):
                return
            os.close(self._owner_fd)  # a lock on a removed file: nobody can see it
            self._owner_fd = None
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            token = _new_token()
            path = _owner_lock(self.directory, token)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names(fd, path):
                    self._token, self._owner_fd = token, fd
                    return
            except BlockingIOError:  # a claimer's probe holds it; it removes the file
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # taken by a claimer's probe, or removed by one after we opened it: another token
        raise OSError(f"could not take an owner lock in {self.directory}")

    def close(self) -> None:
        """Give up this spool's files: remove its owner lock file and release the lock. Its pending files are then
        any spool's to claim (this one's too, should it be used again: it then owns new files)."""
        with self._lock:
            fd, self._owner_fd = self._owner_fd, None
            if fd is None:
                return
            try:
                _remove_if_names(fd, self.owner_lock_path)  # while locked, so no probe takes a file still in use
            finally:
                os.close(fd)  # the only descriptor of that open file description: the lock goes with it

    def _forget_inherited_lock(self) -> None:
        """In a forked child: the owner lock belongs to the parent (the child shares its open file description).
        Close the child's descriptor without unlocking (``LOCK_UN`` would unlock the parent's too); the child
        owns new files under a token of its own once it uses the spool."""
        self._lock = threading.Lock()  # the forking thread held it across the fork (_before_fork)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
            self._token = _new_token()
        self._spooled = 0

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` to the pending file and fsync it: when this returns, they survive a crash."""
        if rows:
            self._write(_PENDING, [orjson.dumps(row) for row in rows])
            self._spooled += len(rows)

    def reject(self, row: dict[str, Any], reason: str) -> Path:
        """Keep a row the database refused, with the reason, in the rejected file; returns the file."""
        return self._write(_REJECTED, [orjson.dumps({"reason": reason, "row": row})])

    def _write(self, kind: str, lines: list[bytes]) -> Path:
        with self._lock:
            self._own()  # before the file exists: a file under this token is never without its owner's lock
            path = self._file(kind)  # under the token _own() may just have renewed
            with path.open("ab") as handle:
                handle.write(b"\n".join(lines) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        return path

    def claim(self) -> list[Path]:
        """Take the files waiting to be stored that are this spool's or were left by an owner that is gone
        (pending, or replaying when it died), oldest first; and remove the lock files of owners that are gone.

        Claimed files are renamed ``replaying-<this token>-...``; store their rows (:meth:`read`), then
        :meth:`release` them.
        """
        if not self.directory.is_dir():
            return []
        claimed: list[Path] = []
        with self._lock:
            self._own()
            owners = _Owners(self.directory, self._token)
            try:
                # Another live owner's pending file is its own to store: it may be appending to it right now.
                pending = (p for p in self.directory.glob(f"{_PENDING}-*.jsonl") if owners.mine_or_gone(p))
                candidates = sorted(pending, key=_modified)
                replaying = (p for p in self.directory.glob(f"{_REPLAYING}-*.jsonl") if owners.gone(p))
                candidates += sorted(replaying, key=_modified)
                for path in candidates:
                    target = self.directory / f"{_REPLAYING}-{self._token}-{uuid.uuid4().hex[:8]}.jsonl"
                    try:
                        path.rename(target)
                    except FileNotFoundError:  # another spool claimed it first
                        continue
                    claimed.append(target)
                owners.sweep()  # owners gone with no file left (a crash with nothing spooled)
            finally:
                owners.remove_gone()
            self._spooled = 0
        return claimed

    def read(self, path: Path, batch: int) -> Iterator[list[dict[str, Any]]]:
        """The rows of a claimed file, ``batch`` at a time. A line that is not a row (a write cut short by a
        crash) is logged and kept in the rejected file, not dropped."""
        rows: list[dict[str, Any]] = []
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(self._row(orjson.loads(line)))
                except (orjson.JSONDecodeError, TypeError, ValueError) as error:
                    kept = self.reject({"line": line.decode(errors="replace")}, f"unreadable spool line: {error}")
                    log.error("spool %s line %d is not a decision row; kept in %s", path.name, number, kept)
                    continue
                if len(rows) >= batch:
                    yield rows
                    rows = []
        if rows:
            yield rows

    def _row(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or "decision_id" not in value:
            raise ValueError("not a decision row")
        for column in self.datetime_columns:
            if isinstance(value.get(column), str):
                value[column] = datetime.fromisoformat(value[column])
        return value

    def unclaim(self, path: Path) -> Path:
        """Put a claimed file back among those waiting to be stored (its replay stopped part-way); returns its name
        now. Its rows already stored are skipped when it is stored again."""
        target = self.directory / f"{_PENDING}-{self._token}-{uuid.uuid4().hex[:8]}.jsonl"
        path.rename(target)
        return target

    @staticmethod
    def release(path: Path) -> None:
        """Delete a claimed file whose rows are all stored (or spooled again)."""
        path.unlink(missing_ok=True)


class _Owners:
    """Which owners of the files in a spool directory are alive, asked once per owner during one claim.

    Asking takes the owner's lock from a new open file description: it is refused while the owner holds it. An
    owner found gone stays locked here until the claim ends (:meth:`remove_gone`), so another claimer sees it as
    taken meanwhile and a new spool cannot come to own that lock file.
    """

    def __init__(self, directory: Path, own_token: str) -> None:
        self.directory = directory
        self.own_token = own_token
        self._alive: set[str] = set()
        self._gone: dict[str, int | None] = {}  # token -> descriptor holding its lock (None: it has no lock file)

    def mine_or_gone(self, path: Path) -> bool:
        return _token(path) == self.own_token or self.gone(path)

    def gone(self, path: Path) -> bool:
        """Whether nobody holds the lock of ``path``'s owner (never this spool: its files are its own)."""
        token = _token(path)
        if token is None:  # a name no spool writes: it has no owner to wait for
            return True
        return token != self.own_token and self._token_gone(token)

    def _token_gone(self, token: str) -> bool:
        if token in self._alive:
            return False
        if token in self._gone:
            return True
        try:
            fd = os.open(_owner_lock(self.directory, token), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # No lock file: its owner closed (and removed it), or a claimer removed it, or the file was written by
            # the code before owner locks, whose files named only a process id. All are stored now: a process of
            # that older code still running on this directory would have its files taken from under it, so stop
            # those before starting this version on a shared spool directory.
            self._gone[token] = None
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._alive.add(token)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._gone[token] = fd
        return True

    def sweep(self) -> None:
        """Ask about every owner lock file not asked about yet, so those of owners gone are removed too."""
        for path in self.directory.glob(f"{_OWNER}-*.lock"):
            token = path.name[len(_OWNER) + 1 : -len(".lock")]
            if token != self.own_token:
                self._token_gone(token)

    def remove_gone(self) -> None:
        """Remove the lock files of the owners found gone (their files are claimed) and let go of them."""
        for token, fd in self._gone.items():
            if fd is None:
                continue
            try:
                _remove_if_names(fd, _owner_lock(self.directory, token))
            except OSError:
                log.warning("could not remove the stale spool lock file %s", _owner_lock(self.directory, token))
            finally:
                os.close(fd)
        self._gone.clear()


def _new_token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the process id is for people; uniqueness is the uuid's


def _owner_lock(directory: Path, token: str) -> Path:
    return directory / f"{_OWNER}-{token}.lock"


def _token(path: Path) -> str | None:
    """The owner token in a spool file name (``<kind>-<pid>-<hex>[-<n>].jsonl``); None for a name without one."""
    parts = path.name.removesuffix(".jsonl").split("-")
    return f"{parts[1]}-{parts[2]}" if len(parts) >= 3 else None


def _names(fd: int, path: Path) -> bool:
    """Whether ``path`` is the file open as ``fd`` (not removed, nor replaced, since it was opened)."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_if_names(fd: int, path: Path) -> None:
    if _names(fd, path):
        path.unlink(missing_ok=True)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


#: The spools whose locks the forking thread holds, from just before a fork to just after it.
_HELD_FOR_FORK: list[DecisionSpool] = []


def _before_fork() -> None:
    # No spool may be between opening and recording a lock descriptor, or probing others' locks, when the process
    # forks: the child would keep that descriptor, and with it a lock its dead parent's files could not be claimed
    # past for as long as the child lives.
    _HELD_FOR_FORK[:] = list(_SPOOLS)
    for spool in _HELD_FOR_FORK:
        spool._lock.acquire()


def _after_fork_in_parent() -> None:
    for spool in _HELD_FOR_FORK:
        spool._lock.release()
    _HELD_FOR_FORK.clear()


def _after_fork_in_child() -> None:
    for spool in _HELD_FOR_FORK:
        spool._forget_inherited_lock()
    _HELD_FOR_FORK.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
