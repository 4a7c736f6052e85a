"""Spread new connections evenly over the workers that share one listening socket.

With ``winback serve --workers N`` uvicorn binds one socket and every worker listens on it. Whichever worker the
kernel schedules first takes the pending connections, so a burst of new connections (a client pool opening 32
keep-alive connections at once) often lands entirely on one worker, and the others sit idle for the life of
those connections. Measured on 2 workers, 2 cores, with wrk opening 32 connections: in 1-2 of 14 runs every
connection was on one worker, at about half the throughput of an even spread. Accepting one connection per
wake-up (nginx's ``multi_accept off``) did not change that: the second worker is not running when the burst
arrives, because the load generator and the first worker hold both cores.

So the workers accept least-connections first. Each writes its open-connection count and a heartbeat into a
small shared file in memory (``ConnectionBoard``, one slot per worker). A worker woken by pending connections
takes them while it holds at most ``SLACK`` more than its least-loaded live sibling, then looks again 1 ms later,
which leaves the core to that sibling. A sibling whose heartbeat stopped (hung, paused or dead) does not count,
and a burst of connections waits at most ``MAX_DEFER_SECONDS`` for a sibling that does not take it (one out
of descriptors advertises that it accepts nothing meanwhile; one that stops serving clears its slot). Unlike per-worker
``SO_REUSEPORT`` sockets (which also spread bursts evenly: 14 of 14 runs), a worker that hangs gets no new
connections and a worker that restarts drops no queued ones: the socket and its queue stay shared.

``BalancedAcceptLoop`` is uvloop's loop with that one change, for servers on an already-bound TCP socket (the
multi-worker case); transports, the HTTP protocol, TLS and single-worker servers are uvloop's own. uvicorn takes
the class as its loop factory (``uvicorn.run(..., loop=BALANCED_LOOP)``); the board's path reaches the workers
in ``WINBACK_ACCEPT_BOARD`` (``connection_board``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import select
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import uvloop

BALANCED_LOOP = "service.api.accept:BalancedAcceptLoop"
BOARD_ENV = "WINBACK_ACCEPT_BOARD"

#: How often a worker writes its count and heartbeat; a sibling silent for STALE_SECONDS is left out.
HEARTBEAT_SECONDS = 0.1
STALE_SECONDS = 0.5
#: How long a pending connection is left for a less-loaded sibling, at most (looked at again every RECHECK).
MAX_DEFER_SECONDS = 0.02
RECHECK_SECONDS = 0.001
#: A worker accepts while it holds at most SLACK more connections than its least-loaded live sibling.
SLACK = 1
ACCEPT_BATCH = 16
# accept() errors that say "out of descriptors or memory for now": stop accepting for a moment rather than spin
# on a socket that stays readable (the pending connections wait in the backlog, or go to another worker).
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_PAUSE_SECONDS = 1.0

logger = logging.getLogger("winback.api")

_SLOT = struct.Struct("<qqd")  # pid, open connections, heartbeat (time.monotonic(): one clock for the machine)
#: The count a worker advertises while it cannot accept (out of descriptors): no sibling waits for it.
NOT_ACCEPTING = 2**62
_BOARD_PREFIX = "winback-accept-"
_SERVE_LOCK = "serve.lock"
ABANDONED_SETUP_SECONDS = 60.0
SPARE_SLOTS = 16


def try_flock(path: Path, *, create: bool) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path``, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class ConnectionBoard:
    """Open-connection counts and heartbeats of the workers, in a file each worker maps into memory.

    A worker owns slot *i* while it holds the ``flock`` of ``<board>.<i>.lock`` (``claim``). ``flock`` locks
    belong to the open file, not the process: opening and closing the board elsewhere in the process leaves them
    alone, and the kernel drops them when the worker exits, so a restarted worker reuses a dead one's slot.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "r+b")  # noqa: SIM115 (kept open: the map is read for the worker's life)
        self.slots = os.fstat(self._file.fileno()).st_size // _SLOT.size
        if self.slots < 1:
            self._file.close()
            raise ValueError(f"{path} is not a connection board (it is {self.slots * _SLOT.size} bytes)")
        self._map = mmap.mmap(self._file.fileno(), self.slots * _SLOT.size)
        self.slot: int | None = None
        self._slot_lock: int | None = None

    @staticmethod
    def create(path: str | Path, slots: int) -> Path:
        """Write an empty board of ``slots`` slots at ``path``."""
        Path(path).write_bytes(bytes(slots * _SLOT.size))
        return Path(path)

    def claim(self) -> int:
        """Take the first slot no live process holds; raise OSError if every slot is held."""
        for slot in range(self.slots):
            fd = try_flock(self.path.with_name(f"{self.path.name}.{slot}.lock"), create=True)
            if fd is None:
                continue
            self.slot, self._slot_lock = slot, fd
            self.write(0)
            return slot
        raise OSError(errno.EBUSY, f"all {self.slots} slots of the connection board are held")

    def write(self, open_connections: int, now: float | None = None) -> None:
        if self.slot is None:
            raise RuntimeError("write() before claim()")
        heartbeat = time.monotonic() if now is None else now
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, os.getpid(), open_connections, heartbeat)

    def read(self, slot: int) -> tuple[int, int, float]:
        """(pid, open connections, heartbeat) of ``slot``; pid 0 if no worker holds it."""
        pid, connections, heartbeat = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return int(pid), int(connections), float(heartbeat)

    def least_loaded(self, open_connections: int, now: float | None = None) -> bool:
        """True if no live sibling (heartbeat within STALE_SECONDS) holds fewer than ``open_connections``
        connections."""
        moment = time.monotonic() if now is None else now
        for slot in range(self.slots):
            if slot == self.slot:
                continue
            pid, connections, heartbeat = self.read(slot)
            if pid and moment - heartbeat <= STALE_SECONDS and connections < open_connections:
                return False
        return True

    def close(self) -> None:
        """Leave the board: the slot is cleared first (no sibling waits for a worker that stopped accepting),
        then given up."""
        if self.slot is not None:
            with contextlib.suppress(ValueError):
                _SLOT.pack_into(self._map, self.slot * _SLOT.size, 0, 0, 0.0)
        with contextlib.suppress(ValueError, OSError):
            self._map.close()
        self._file.close()
        if self._slot_lock is not None:
            os.close(self._slot_lock)
            self._slot_lock = None
        self.slot = None


def _boards_folder() -> Path:
    # In memory (tmpfs) where there is one: on a disk-backed file, writing a page the kernel is writing back can
    # stall the worker's loop (seen: p99 from 45 to 100-300 ms under load with the board in ext4's /tmp).
    memory = Path("/dev/shm")
    return memory if memory.is_dir() and os.access(memory, os.W_OK) else Path(tempfile.gettempdir())


def _sweep_abandoned_boards(folder: Path) -> None:
    """Remove the board folders of ``winback serve`` processes that are gone (killed before they could clean up):
    a live one holds the flock of its folder's serve.lock (``.serve.lock`` while it sets the folder up). A folder
    with neither is not one this code made, and is left alone."""
    for board_folder in folder.glob(f"{_BOARD_PREFIX}*"):
        fd = unheld_lock(board_folder / _SERVE_LOCK)
        if fd is None:
            # Killed while setting up (the lock taken, not yet renamed), if that was long enough ago.
            fd = unheld_lock(board_folder / f".{_SERVE_LOCK}")
            with contextlib.suppress(OSError):
                if fd is not None and time.time() - board_folder.stat().st_mtime <= ABANDONED_SETUP_SECONDS:
                    os.close(fd)
                    fd = None
        if fd is not None:
            shutil.rmtree(board_folder, ignore_errors=True)
            os.close(fd)


def unheld_lock(path: Path) -> int | None:
    """A descriptor holding ``path``'s flock if the file exists and no one holds it, else None."""
    try:
        return try_flock(path, create=False)
    except OSError:  # missing, or another user's
        return None


@contextlib.contextmanager
def connection_board(workers: int) -> Iterator[dict[str, str]]:
    """A board for ``workers`` workers in a private temporary folder, for as long as the block runs; yields the
    environment variable that tells the workers where it is (none for one worker: it has no sibling, and none if
    the board cannot be made: the workers then accept first come, first served). Folders left by a serve that
    was killed are removed first."""
    if workers < 2:
        yield {}
        return
    parent = _boards_folder()
    folder: Path | None = None
    serve_lock: int | None = None
    env: dict[str, str] = {}
    try:
        _sweep_abandoned_boards(parent)
        folder = Path(tempfile.mkdtemp(prefix=_BOARD_PREFIX, dir=parent))
        # Locked before it has its name, so a sweeper never finds it unlocked.
        serve_lock = try_flock(folder / f".{_SERVE_LOCK}", create=True)
        os.rename(folder / f".{_SERVE_LOCK}", folder / _SERVE_LOCK)
        # Room beyond the workers: one being replaced may still hold its slot while its successor starts, and
        # uvicorn adds a worker on each SIGTTIN. A worker finding no free slot accepts first come, first served.
        env = {BOARD_ENV: str(ConnectionBoard.create(folder / "board", 2 * workers + SPARE_SLOTS))}
    except OSError as error:
        logger.warning(
            "connections are accepted first come, first served: no connection board could be made in %s (%s)",
            parent,
            error,
            extra={"event": "accept_board_unusable"},
        )
    try:
        yield env
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if serve_lock is not None:
            os.close(serve_lock)


def _board_from_env() -> ConnectionBoard | None:
    path = os.environ.get(BOARD_ENV)
    if not path:
        return None
    board: ConnectionBoard | None = None
    try:
        board = ConnectionBoard(path)
        board.claim()
    except (OSError, ValueError) as error:
        if board is not None:
            board.close()
        logger.warning(
            "connections are accepted first come, first served: the connection board is unusable (%s)",
            error,
            extra={"event": "accept_board_unusable"},
        )
        return None
    return board


class LeastConnectionsServer(asyncio.AbstractServer):
    """A server on a listening TCP socket shared with sibling workers: it accepts pending connections while no
    live sibling on ``board`` holds SLACK or more fewer connections than it does (see the module's docstring).

    Connections go to the loop's own transport (``connect_accepted_socket``). ``close()`` stops accepting and
    closes this process's copy of the socket; the siblings keep theirs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        backlog: int,
        board: ConnectionBoard | None,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol_factory = protocol_factory
        self._board = board
        self._serving = False
        self._closed = False
        self._reading = False
        self._transports: list[asyncio.BaseTransport] = []
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._wake: asyncio.TimerHandle | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._deferred_since: float | None = None
        self._poll: select.poll | None = None
        self._paused = False  # out of descriptors: not accepting for RESOURCE_PAUSE_SECONDS
        self.deferred = 0  # waits that left pending connections to a sibling (for tests and debugging)
        sock.setblocking(False)
        sock.listen(backlog)

    @property
    def open_connections(self) -> int:
        """Connections this server accepted that are still open (or being set up)."""
        self._transports = [transport for transport in self._transports if not transport.is_closing()]
        return len(self._transports) + len(self._handshakes)

    # -- accepting ---------------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        self._read()
        if self._board is not None:
            self._beat()

    def _read(self) -> None:
        if self._serving and not self._reading:
            self._reading = True
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def _unread(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _later(self, delay: float) -> None:
        """Stop watching the socket for ``delay`` seconds."""
        self._unread()
        self._wake = self._loop.call_later(delay, self._wake_up)

    def _wake_up(self) -> None:
        self._wake = None
        if self._paused:
            self._paused = False
            self._advertise()
        if self._deferred_since is not None and not self._pending():
            self._deferred_since = None  # what was left for a sibling was taken: the next wait starts afresh
        self._read()

    def _pending(self) -> bool:
        """Whether a connection waits to be accepted (the socket is readable now). poll, not select: select
        cannot watch a descriptor numbered 1024 or more, which a busy worker's socket may be."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._sock.fileno(), select.POLLIN)
        return bool(self._poll.poll(0))

    def _advertise(self) -> None:
        if self._board is not None:
            self._board.write(NOT_ACCEPTING if self._paused else self.open_connections)

    def _beat(self) -> None:
        self._advertise()
        self._heartbeat = self._loop.call_later(HEARTBEAT_SECONDS, self._beat)

    def _accept_ready(self) -> None:
        """Accept pending connections while no live sibling holds SLACK or more fewer than this worker, up to
        ACCEPT_BATCH per wake-up (a burst is taken in a few loop iterations, not one per iteration).

        Left for a sibling, pending connections are looked at again every RECHECK_SECONDS. Once they have waited
        MAX_DEFER_SECONDS (the sibling looks live but does not take them), this worker takes one per recheck
        until none is left: the wait is paid once per burst, not once per connection, and a sibling that was only
        slow to run still gets its share."""
        for _ in range(ACCEPT_BATCH):
            overdue = False
            if self._board is not None and not self._board.least_loaded(self.open_connections - SLACK):
                if not self._pending():
                    self._deferred_since = None
                    return  # nothing left to leave to anyone (a sibling took what woke this worker)
                now = time.monotonic()
                if self._deferred_since is None:
                    self._deferred_since = now
                    self.deferred += 1
                if now - self._deferred_since < MAX_DEFER_SECONDS:
                    self._later(RECHECK_SECONDS)
                    return
                overdue = True
            else:
                self._deferred_since = None
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                self._deferred_since = None  # none left: a sibling took it, or the client gave up
                return
            except OSError as error:
                if error.errno in _RESOURCE_ERRORS:
                    logger.error(
                        "not accepting connections for %g s: %s",
                        RESOURCE_PAUSE_SECONDS,
                        error.strerror,
                        extra={"event": "accept_paused"},
                    )
                    self._paused = True  # advertised, so no sibling leaves connections to this worker meanwhile
                    self._advertise()
                    self._later(RESOURCE_PAUSE_SECONDS)
                    return
                # a network error on that one pending connection (accept(2) lists them): the next may be fine
                logger.warning("could not accept a connection: %s", error, extra={"event": "accept_failed"})
                continue
            conn.setblocking(False)
            handshake = self._loop.create_task(self._hand_over(conn))
            self._handshakes.add(handshake)
            handshake.add_done_callback(self._handshakes.discard)
            self._advertise()
            if overdue:
                self._later(RECHECK_SECONDS)  # the next one a recheck later: the sibling may be about to run
                return

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            transport, _ = await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except Exception:
            conn.close()
            logger.exception("could not set up an accepted connection", extra={"event": "accept_failed"})
            return
        if self._closed:
            # Accepted just before close(): the server (uvicorn) has already told the connections it knew of to
            # finish, and would wait for this one's client to leave. Closed now, as it closes an idle connection.
            transport.close()
            return
        # Counted once, in the same step: left in _handshakes until its done-callback runs (a loop iteration
        # later), this connection would be counted twice by a heartbeat in between and advertised as two.
        handshake = asyncio.current_task()
        if handshake is not None:
            self._handshakes.discard(handshake)
        self._transports.append(transport)

    # -- asyncio.AbstractServer --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._wake, self._heartbeat):
            if timer is not None:
                timer.cancel()
        self._unread()
        self._serving = False
        self._sock.close()
        if self._board is not None:
            self._board.close()
            self._board = None

    async def wait_closed(self) -> None:
        """Returns once no connection is still being handed over (the connections themselves are the caller's:
        uvicorn closes them before it waits here)."""
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._start()

    async def serve_forever(self) -> None:
        self._start()
        await asyncio.Future()  # until cancelled, as asyncio's Server.serve_forever

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    async def __aenter__(self) -> LeastConnectionsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


class BalancedAcceptLoop(uvloop.Loop):
    """uvloop's event loop, whose servers on an already-bound TCP socket accept least-connections first."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | Iterable[str] | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        ssl: Any = None,
        backlog: int = 100,
        start_serving: bool = True,
        **options: Any,
    ) -> asyncio.AbstractServer:
        if (
            sock is None
            or ssl is not None
            or options
            or sock.type != socket.SOCK_STREAM
            or sock.family not in (socket.AF_INET, socket.AF_INET6)
        ):
            options |= {"host": host, "port": port, "sock": sock, "ssl": ssl, "backlog": backlog}
            return await super().create_server(protocol_factory, start_serving=start_serving, **options)
        server = LeastConnectionsServer(self, sock, protocol_factory, backlog, _board_from_env())
        if start_serving:
            server._start()
        return server
