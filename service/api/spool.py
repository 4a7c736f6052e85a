"""Decision rows kept on local disk while the database cannot take them, so an outage costs neither memory nor rows.

The decision writer queues rows in memory and stores them in batches. While the database is away it waits; once
the backlog passes a bound, or the process shuts down, it moves the rows here instead (JSON lines, fsync'd), and
stores them when the database is back or, failing that, at the next start of any API process on the same
directory. Rows the database refuses for their own sake (not an outage) go to a ``rejected-*`` file an operator can
inspect; they are never retried automatically.

File names carry the writing process id: ``pending-<pid>-<token>.jsonl`` are waiting to be stored,
``replaying-<pid>-<token>.jsonl`` are being stored by that process. A process claims a file by renaming it (atomic
on one file system), so two workers never store the same file; a ``replaying`` file whose process is gone (it
died mid-replay) is claimed again. Storing is idempotent by ``decision_id``, so a replay that is interrupted and
resumed stores nothing twice.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("winback.api")

_PENDING, _REPLAYING, _REJECTED = "pending", "replaying", "rejected"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class DecisionSpool:
    """An append-only journal of decision rows in ``directory`` (created on first use); thread-safe.

    ``datetime_columns`` are written as ISO 8601 and read back as datetimes; every other value must be JSON.
    """

    def __init__(self, directory: str | Path, datetime_columns: tuple[str, ...]) -> None:
        self.directory = Path(directory)
        self.datetime_columns = datetime_columns
        self._pid = os.getpid()
        self._token = f"{self._pid}-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._spooled = 0  # rows appended to this process's pending file since it was last claimed

    @property
    def pending_path(self) -> Path:
        """This process's file of rows waiting to be stored."""
        return self.directory / f"{_PENDING}-{self._token}.jsonl"

    @property
    def rejected_path(self) -> Path:
        """This process's file of rows the database refused."""
        return self.directory / f"{_REJECTED}-{self._token}.jsonl"

    @property
    def holds_rows(self) -> bool:
        """Whether this process spooled rows it has not claimed back yet."""
        return self._spooled > 0

    def check_writable(self) -> None:
        """Create the directory and write and remove a probe file there: a spool that cannot be written is found
        at start, not in the middle of an outage. OSError naming the directory otherwise."""
        probe = self.directory / f".probe-{self._token}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise OSError(
                f"the decision spool directory {self.directory} (WINBACK_SPOOL_DIR) cannot be written: {error}"
            ) from error

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` to the pending file and fsync it: when this returns, they survive a crash."""
        if rows:
            self._write(self.pending_path, [orjson.dumps(row) for row in rows])
            self._spooled += len(rows)

    def reject(self, row: dict[str, Any], reason: str) -> Path:
        """Keep a row the database refused, with the reason, in the rejected file; returns the file."""
        self._write(self.rejected_path, [orjson.dumps({"reason": reason, "row": row})])
        return self.rejected_path

    def _write(self, path: Path, lines: list[bytes]) -> None:
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as handle:
                handle.write(b"\n".join(lines) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())

    def claim(self) -> list[Path]:
        """Take the files waiting to be stored that are this process's or were left by a process that is gone
        (pending, or replaying when it died), oldest first.

        Claimed files are renamed ``replaying-<this pid>-...``; store their rows (:meth:`read`), then
        :meth:`release` them.
        """
        if not self.directory.is_dir():
            return []
        claimed: list[Path] = []
        with self._lock:
            # Another live process's pending file is its own to store: it may be appending to it right now.
            pending = (p for p in self.directory.glob(f"{_PENDING}-*.jsonl") if self._owner(p) in (self._pid, None))
            candidates = sorted(pending, key=_modified)
            replaying = (p for p in self.directory.glob(f"{_REPLAYING}-*.jsonl") if self._owner(p) is None)
            candidates += sorted(replaying, key=_modified)
            for path in candidates:
                target = self.directory / f"{_REPLAYING}-{self._token}-{uuid.uuid4().hex[:8]}.jsonl"
                try:
                    path.rename(target)
                except FileNotFoundError:  # another process claimed it first
                    continue
                claimed.append(target)
            self._spooled = 0
        return claimed

    def _owner(self, path: Path) -> int | None:
        """The id of the live process that wrote ``path``; None when that process is gone."""
        owner = path.name.split("-")[1]
        return int(owner) if owner.isdigit() and _process_alive(int(owner)) else None

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


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
