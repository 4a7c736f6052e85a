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


def test_a_board_of_the_wrong_size_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty is not a connection board"):
        ConnectionBoard(tmp_path / "empty")


def _sibling(path: Path, slot: int, connections: int, heartbeat: float, pid: int = 1) -> None:
    """Write a sibling's row as that sibling would (rows of other processes are plain data to this one)."""
    row = ConnectionBoard(path)
    row.slot = slot
    row.write(connections, now=heartbeat)
    if pid != os.getpid():
        accept._SLOT.pack_into(row._map, slot * accept._SLOT.size, pid, connections, heartbeat)
    row.close()


def test_least_loaded_counts_only_live_siblings(tmp_path: Path) -> None:
    path = ConnectionBoard.create(tmp_path / "board", 4)
    board = ConnectionBoard(path)
    board.claim()
    now = time.monotonic()
    assert board.least_loaded(5, now=now)  # no sibling ever claimed a slot
    _sibling(path, 1, connections=3, heartbeat=now)
    assert board.least_loaded(3, now=now)  # as many as the sibling: still least-loaded
    assert not board.least_loaded(4, now=now)
    # A sibling silent for longer than STALE_SECONDS is hung, paused or dead: new connections do not wait for it.
    assert board.least_loaded(4, now=now + accept.STALE_SECONDS + 0.01)
    _sibling(path, 2, connections=0, heartbeat=now - 60)
    assert not board.least_loaded(4, now=now)
    assert board.read(1)[:2] == (1, 3)
    board.close()


def test_connection_board_lives_in_memory_for_the_block_and_names_itself_to_the_workers() -> None:
    with connection_board(workers=3) as env:
        path = Path(env[BOARD_ENV])
        assert path.stat().st_size == 6 * accept._SLOT.size
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

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        sock = _bound_socket()
        port = sock.getsockname()[1]
        server = await loop.create_server(_Echo, sock=sock)
        assert isinstance(server, LeastConnectionsServer)
        fresh = time.monotonic() + (3600 if sibling_alive else -3600)
        _sibling(path, 1, connections=0, heartbeat=fresh, pid=os.getppid())
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:
            writer.write(b"x")
        for reader, _ in held:
            assert await asyncio.wait_for(reader.readexactly(1), timeout=10) == b"x"
        assert server.open_connections == 2
        deferred_before = server.deferred
        assert await _echo_through(port, b"third") == b"third"
        deferred = server.deferred - deferred_before
        for _, writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
        return deferred

    assert _run_in_balanced_loop(scenario()) == (1 if sibling_alive else 0)


class _FlakySocket(socket.socket):
    """A listening socket whose first accept() finds the process out of file descriptors."""

    failures = 1

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accept, "RESOURCE_PAUSE_SECONDS", 0.05)
    monkeypatch.delenv(BOARD_ENV, raising=False)

    async def scenario() -> None:
        sock = _bound_socket(_FlakySocket)
        port = sock.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(_Echo, sock=sock)
        assert await _echo_through(port, b"after the pause") == b"after the pause"
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="winback.api"):
        _run_in_balanced_loop(scenario())
    paused = ["not accepting connections for 0.05 s: Too many open files"]
    assert [record.getMessage() for record in caplog.records] == paused


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
    sock = _bound_socket()
    port = sock.getsockname()[1]
    with connection_board(workers=2) as env:
        board_path = env[BOARD_ENV]
        stop = context.Event()
        workers = [context.Process(target=_pid_worker, args=(sock, board_path, stop)) for _ in range(2)]
        for worker in workers:
            worker.start()
        try:
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
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
        sock.close()
    assert sum(served_by.values()) == 20
    assert set(served_by) == {w.pid for w in workers}
    assert min(served_by.values()) >= 5, served_by
