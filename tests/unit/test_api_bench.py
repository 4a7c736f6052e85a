"""The API benchmark's own arithmetic: CPU per request of a server's process tree."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time

import pytest

from service.api.bench import BenchResult, LoadFigures, fixed_rate, tree_cpu_seconds


def _figures(requests: int, cpu_ms: float = math.nan) -> LoadFigures:
    return LoadFigures(requests=requests, errors=0, seconds=1.0, rps=float(requests), p50_ms=1.0, p99_ms=2.0,
                       cpu_ms_per_request=cpu_ms)  # fmt: skip


def test_tree_cpu_counts_the_cpu_of_child_processes() -> None:
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        own_before = tree_cpu_seconds(child.pid)
        deadline = time.monotonic() + 20
        while tree_cpu_seconds(child.pid) < own_before + 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_seconds(child.pid) >= own_before + 0.3
        # The parent's tree holds the child: its figure is at least the child's.
        assert tree_cpu_seconds(os.getpid()) >= tree_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()


def test_cpu_ratio_compares_cpu_per_request_and_is_nan_when_unknown() -> None:
    result = BenchResult(
        api=_figures(1000, cpu_ms=0.5),
        mlflow=_figures(200, cpu_ms=2.0),
        api_fixed_rate=_figures(300),
        mlflow_fixed_rate=None,
        ratio=5.0,
        fixed_rate=300.0,
        model_version="1",
        candidates_per_request=44,
        reference_model={"features": 69, "trees": 82, "leaves": 31},
    )
    assert result.cpu_ratio() == 4.0
    assert result.as_dict()["cpu_ratio"] == 4.0
    result.mlflow = _figures(200)
    assert math.isnan(result.cpu_ratio())


async def _serve_http(status: int, seen: list[bytes]) -> asyncio.Server:
    """A loopback HTTP/1.1 server answering every POST with ``status`` and a small body, keeping connections."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                             .split(b":")[1])  # fmt: skip
                seen.append(await reader.readexactly(length))
                answer = b'{"ok":true}'
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(("status", "ok"), [(200, True), (503, False)])
def test_fixed_rate_sends_on_schedule_over_keep_alive_connections(status: int, ok: bool) -> None:
    seen: list[bytes] = []

    async def scenario() -> LoadFigures:
        server = await _serve_http(status, seen)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await fixed_rate(f"http://127.0.0.1:{port}/v1/decisions", b'{"a":1}', {"X-Key": "k"},
                                    rate=200, seconds=0.5)  # fmt: skip

    figures = asyncio.run(scenario())
    assert (figures.requests, figures.errors) == ((100, 0) if ok else (0, 100))
    assert seen == [b'{"a":1}'] * 120  # 20 warm-up requests first
    assert figures.seconds < 5
