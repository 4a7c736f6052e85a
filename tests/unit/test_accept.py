"""Least-connections accepting over workers that share one listening socket (service/api/accept.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from service.api import accept
from service.api.accept import (
    BOARD_ENV,
    BalancedAcceptLoop,
    ConnectionBoard,
    LeastConnectionsServer,
    connection_board,
)

CLAIM_IN_CHILD = (
    "import sys, time; from service.api.accept import ConnectionBoard; "
    "board = ConnectionBoard(sys.argv[1]); print(board.claim(), flush=True); time.sleep(float(sys.argv[2]))"
)


def _claim_in_child(path: Path, hold_seconds: float = 0.0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM_IN_CHILD, str(path), str(hold_seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def _first_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


def test_each_live_process_holds_its_own_slot_and_a_dead_ones_slot_is_reused(tmp_path: Path) -> None:
    path = ConnectionBoard.create(tmp_path / "board", 3)
    board = ConnectionBoard(path)
    assert board.claim() == 0
    holders = [_claim_in_child(path, hold_seconds=60)]
    try:
        assert _first_line(holders[0]) == "1"
        passer = _claim_in_child(path)
        holders.append(passer)
        assert _first_line(passer) == "2"
        assert passer.wait(timeout=30) == 0
        holders.append(_claim_in_child(path, hold_seconds=60))
        assert _first_line(holders[2]) == "2"  # the process that held slot 2 has exited: its lock went with it
        refused = subprocess.run(
            [sys.executable, "-c", CLAIM_IN_CHILD, str(path), "0"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert refused.returncode != 0
        assert "all 3 slots of the connection board are held" in refused.stderr
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()
        board.close()


def test_slots_are_held_per_open_board_not_per_process(tmp_path: Path) -> None:
    """flock locks belong to the open file: a second board in one process takes another slot, and opening and
    closing the board file elsewhere in the process (as POSIX record locks would) releases nothing."""
    path = ConnectionBoard.create(tmp_path / "board", 2)
    first, second = ConnectionBoard(path), ConnectionBoard(path)
    assert (first.claim(), second.claim()) == (0, 1)
    path.read_bytes()  # another open and close of the file
    third = ConnectionBoard(path)
    with pytest.raises(OSError, match="all 2 slots"):
        third.claim()
    second.close()
    assert third.claim() == 1
    for board in (first, third):
        board.close()


def test_a_board_of_the_wrong_size_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty is not a connection board"):
        ConnectionBoard(tmp_path / "empty")


def _sibling(path: Path, connections: int, heartbeat: float) -> ConnectionBoard:
    """A sibling worker's slot on the board at ``path`` (the caller closes it)."""
    sibling = ConnectionBoard(path)
    sibling.claim()
    sibling.write(connections, now=heartbeat)
    return sibling


def test_least_loaded_counts_only_live_siblings(tmp_path: Path) -> None:
    path = ConnectionBoard.create(tmp_path / "board", 4)
    board = ConnectionBoard(path)
    board.claim()
    now = time.monotonic()
    assert board.least_loaded(5, now=now)  # no sibling holds a slot
    busy = _sibling(path, connections=3, heartbeat=now)
    assert board.least_loaded(3, now=now)  # as many as the sibling: still least-loaded
    assert not board.least_loaded(4, now=now)
    # A sibling silent for longer than STALE_SECONDS is hung, paused or dead: new connections do not wait for it.
    assert board.least_loaded(4, now=now + accept.STALE_SECONDS + 0.01)
    silent = _sibling(path, connections=0, heartbeat=now - 60)
    assert board.least_loaded(1, now=now)
    # One out of descriptors advertises NOT_ACCEPTING: nobody waits for it either.
    silent.write(accept.NOT_ACCEPTING, now=now)
    assert board.least_loaded(3, now=now)
    # A sibling that leaves clears its slot first.
    assert board.read(busy.slot or 0)[:2] == (os.getpid(), 3)
    slot = busy.slot
    busy.close()
    assert board.read(slot or 0) == (0, 0, 0.0)
    assert board.least_loaded(5, now=now)
    for left in (silent, board):
        left.close()


def test_connection_board_lives_in_memory_for_the_block_and_names_itself_to_the_workers() -> None:
    with connection_board(workers=3) as env:
        path = Path(env[BOARD_ENV])
        assert path.stat().st_size == (6 + accept.SPARE_SLOTS) * accept._SLOT.size
        if Path("/dev/shm").is_dir():
            assert path.is_relative_to("/dev/shm")
    assert not path.exists()
    with connection_board(workers=1) as env:
        assert env == {}


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _echo_through(port: int, text: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(text)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readexactly(len(text)), timeout=10)
    writer.close()
    return answer


def _bound_socket(kind: type[socket.socket] = socket.socket) -> socket.socket:
    sock = kind(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _run_in_balanced_loop(coroutine: Any) -> Any:
    loop = BalancedAcceptLoop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def test_a_server_on_a_bound_socket_serves_counts_and_closes_its_connections() -> None:
    async def scenario() -> None:
        sock = _bound_socket()
        port = sock.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock)
        assert isinstance(server, LeastConnectionsServer)
        assert server.is_serving()
        assert server.sockets == (sock,)
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for index, (reader, writer) in enumerate(streams):
            writer.write(b"ping %d" % index)
            assert await asyncio.wait_for(reader.readexactly(6), timeout=10) == b"ping %d" % index
        assert server.open_connections == 3
        streams[0][1].close()
        await streams[0][1].wait_closed()
        for _ in range(100):
            if server.open_connections == 2:
                break
            await asyncio.sleep(0.01)
        assert server.open_connections == 2
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        assert server.sockets == ()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        for _, writer in streams[1:]:
            writer.close()

    _run_in_balanced_loop(scenario())


def test_a_connection_just_set_up_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count right after a connection's set-up, before the loop runs anything else (a heartbeat could):
    the connection is counted as open, not also as still being set up."""
    counts: list[int] = []
    hand_over = LeastConnectionsServer._hand_over

    async def counting_hand_over(self: LeastConnectionsServer, conn: socket.socket) -> None:
        await hand_over(self, conn)
        counts.append(self.open_connections)

    monkeypatch.setattr(LeastConnectionsServer, "_hand_over", counting_hand_over)

    async def scenario() -> None:
        sock = _bound_socket()
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock)
        assert await _echo_through(sock.getsockname()[1], b"once") == b"once"
        server.close()
        await server.wait_closed()

    _run_in_balanced_loop(scenario())
    assert counts == [1]


def test_servers_on_a_host_and_port_are_uvloops_own() -> None:
    async def scenario() -> None:
        server = await asyncio.get_running_loop().create_server(_Echo, host="127.0.0.1", port=0)
        assert not isinstance(server, LeastConnectionsServer)
        port = server.sockets[0].getsockname()[1]
        assert await _echo_through(port, b"plain") == b"plain"
        server.close()
        await server.wait_closed()

    _run_in_balanced_loop(scenario())


@pytest.mark.parametrize("sibling_alive", [True, False])
def test_a_busier_worker_leaves_a_new_connection_to_a_live_sibling_but_never_strands_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sibling_alive: bool
) -> None:
    """Holding two connections, with a sibling at none, the third waits for the sibling only if the sibling's
    heartbeat is fresh; here the sibling never accepts, so the connection is still served (after the wait)."""
    path = ConnectionBoard.create(tmp_path / "board", 2)
    monkeypatch.setenv(BOARD_ENV, str(path))

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        sock = _bound_socket()
        port = sock.getsockname()[1]
        server = await loop.create_server(_Echo, sock=sock)
        assert isinstance(server, LeastConnectionsServer)
        sibling = _sibling(path, connections=0, heartbeat=time.monotonic() + (3600 if sibling_alive else -3600))
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:
            writer.write(b"x")
        for reader, _ in held:
            assert await asyncio.wait_for(reader.readexactly(1), timeout=10) == b"x"
        assert server.open_connections == 2
        left_for_sibling = server.deferred  # none: no connection was pending while this worker was the busier
        assert await _echo_through(port, b"third") == b"third"
        deferred = server.deferred - left_for_sibling
        for _, writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
        sibling.close()
        return left_for_sibling, deferred

    assert _run_in_balanced_loop(scenario()) == (0, 1 if sibling_alive else 0)


def test_a_burst_waits_for_an_unresponsive_sibling_once_not_once_per_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ConnectionBoard.create(tmp_path / "board", 2)
    monkeypatch.setenv(BOARD_ENV, str(path))

    async def scenario() -> int:
        sock = _bound_socket()
        port = sock.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock)
        assert isinstance(server, LeastConnectionsServer)
        sibling = _sibling(path, connections=0, heartbeat=time.monotonic() + 3600)  # looks live, never accepts
        burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]  # all pending before any accept
        for index, client in enumerate(burst):
            client.sendall(b"%d" % index)
        for index, client in enumerate(burst):  # each stays open: a closed one would no longer count
            client.settimeout(10)
            assert await asyncio.to_thread(client.recv, 1) == b"%d" % index
        for client in burst:
            client.close()
        server.close()
        await server.wait_closed()
        sibling.close()
        return server.deferred

    # The first two are taken at once (SLACK); the four others waited for the sibling together, once.
    assert _run_in_balanced_loop(scenario()) == 1


def test_a_connection_accepted_as_the_server_closes_is_closed_not_left_open() -> None:
    """uvicorn tells the connections it knows of to finish, then waits for all of them: one still being handed
    over when the server closed would keep it waiting for as long as its client stayed."""

    async def scenario() -> bytes:
        sock = _bound_socket()
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock, start_serving=False)
        assert isinstance(server, LeastConnectionsServer)
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        server._accept_ready()  # accepted; its hand-over has not run yet
        server.close()
        await server.wait_closed()
        left = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        return left

    assert _run_in_balanced_loop(scenario()) == b""  # the server closed it


def test_folders_of_serves_that_are_gone_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    names = ("gone", "live", "setting-up", "died-setting-up", "not-ours")
    gone, live, setting_up, died_setting_up, not_ours = (tmp_path / f"{accept._BOARD_PREFIX}{name}" for name in names)
    for folder in (gone, live, setting_up, died_setting_up, not_ours):
        folder.mkdir()
    (gone / "serve.lock").touch()
    (setting_up / ".serve.lock").touch()
    (died_setting_up / ".serve.lock").touch()
    (not_ours / "board").touch()  # no lock file at all: not made by this code (or by an older build, still live)
    long_ago = time.time() - accept.ABANDONED_SETUP_SECONDS - 1
    for folder in (died_setting_up, not_ours):
        os.utime(folder, (long_ago, long_ago))
    (tmp_path / "other-folder").mkdir()
    held = accept.try_flock(live / "serve.lock", create=True)
    assert held is not None
    try:
        accept._sweep_abandoned_boards(tmp_path)
    finally:
        os.close(held)
    assert not gone.exists()
    assert live.exists()
    assert setting_up.exists()  # its serve may be between taking the lock and renaming it
    assert not died_setting_up.exists()
    assert not_ours.exists()
    assert (tmp_path / "other-folder").exists()


def test_a_board_that_cannot_be_made_leaves_the_workers_first_come_first_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accept, "_boards_folder", lambda: tmp_path / "missing")
    with caplog.at_level(logging.WARNING, logger="winback.api"), connection_board(workers=2) as env:
        assert env == {}
    assert "no connection board could be made in" in caplog.text


class _FlakySocket(socket.socket):
    """A listening socket whose first accept() finds the process out of file descriptors."""

    failures = 1

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_out_of_descriptors_pauses_accepting_and_says_so_on_the_board(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accept, "RESOURCE_PAUSE_SECONDS", 0.3)
    path = ConnectionBoard.create(tmp_path / "board", 2)
    monkeypatch.setenv(BOARD_ENV, str(path))

    async def scenario() -> tuple[int, int]:
        sock = _bound_socket(_FlakySocket)
        port = sock.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock)
        watcher = ConnectionBoard(path)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"after the pause")
        while server.sockets and not caplog.records:
            await asyncio.sleep(0.01)
        during = watcher.read(0)[1]
        assert await asyncio.wait_for(reader.readexactly(15), timeout=10) == b"after the pause"
        after = watcher.read(0)[1]
        writer.close()
        server.close()
        await server.wait_closed()
        watcher.close()
        return during, after

    with caplog.at_level(logging.ERROR, logger="winback.api"):
        during, after = _run_in_balanced_loop(scenario())
    assert [record.getMessage() for record in caplog.records] == [
        "not accepting connections for 0.3 s: Too many open files"
    ]
    assert during == accept.NOT_ACCEPTING
    assert after == 1


def test_an_unusable_board_falls_back_to_first_come_first_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(BOARD_ENV, str(tmp_path / "missing"))

    async def scenario() -> None:
        sock = _bound_socket()
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock)
        assert await _echo_through(sock.getsockname()[1], b"served") == b"served"
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="winback.api"):
        _run_in_balanced_loop(scenario())
    assert "the connection board is unusable" in caplog.text
    assert "missing" in caplog.text


class _SayPid(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"%d\n" % os.getpid())  # type: ignore[attr-defined]


def _pid_worker(sock: socket.socket, board_path: str, stop: Any) -> None:
    os.environ[BOARD_ENV] = board_path

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_SayPid, sock=sock)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.close()

    _run_in_balanced_loop(serve())


def test_two_worker_processes_on_one_socket_share_a_burst_of_connections(tmp_path: Path) -> None:
    """The real set-up of ``winback serve --workers 2``: one bound socket, two processes, one board. A burst of
    20 connections opened at once is shared (each worker's share within SLACK of even, give or take what a
    loaded test machine's scheduling allows)."""
    context = multiprocessing.get_context("spawn")
    with _bound_socket() as sock, connection_board(workers=2) as env:
        port = sock.getsockname()[1]
        board_path = env[BOARD_ENV]
        stop = context.Event()
        workers = [context.Process(target=_pid_worker, args=(sock, board_path, stop)) for _ in range(2)]
        try:
            for worker in workers:
                worker.start()
            watcher = ConnectionBoard(board_path)
            deadline = time.monotonic() + 60
            while {watcher.read(slot)[0] for slot in range(watcher.slots)} - {0} != {w.pid for w in workers}:
                assert time.monotonic() < deadline, "the workers did not claim their slots"
                time.sleep(0.05)
            watcher.close()
            clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(20)]
            served_by = Counter(int(client.makefile().readline()) for client in clients)
            for client in clients:
                client.close()
        finally:
            stop.set()
            for worker in workers:
                if worker.pid is None:
                    continue  # not started
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
    assert sum(served_by.values()) == 20
    assert set(served_by) == {w.pid for w in workers}
    assert min(served_by.values()) >= 5, served_by
