"""The API benchmark's own parts: CPU per request of a server's process tree, the traffic and its load generators."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

import service.api.bench as bench_module
from model.merchant_config import load_config
from model.requests import DecisionRequest
from service.api.bench import (
    BENCH_CONFIG,
    BenchResult,
    LoadFigures,
    StallProbe,
    Traffic,
    UnansweredRequestError,
    _check_answered,
    _free_port,
    _measure_in_process,
    _with_cpu,
    bench_env,
    bench_key,
    closed_loop,
    constant_app,
    demo_traffic,
    fixed_rate,
    mixed_traffic,
    server_floor,
    start_api_server,
    stop_servers,
    tree_cpu_seconds,
    tree_pss_mb,
    wrk_closed_loop,
)
from service.signals import sigterm_exits


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


def test_tree_memory_adds_what_a_child_holds_of_its_own() -> None:
    """A grandchild that fills 200 MB of its own memory adds about that much to the tree (PSS: pages shared
    between the processes count once in all)."""
    parent = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', sys.argv[1]])"
    hold = "import time\nblock = bytearray({mb} * 1024 * 1024)\nprint('ready', flush=True)\ntime.sleep(30)"
    trees = [
        subprocess.Popen(
            [sys.executable, "-c", parent, hold.format(mb=mb)], stdout=subprocess.PIPE, start_new_session=True
        )
        for mb in (0, 200)
    ]
    try:
        for tree in trees:
            assert tree.stdout is not None
            assert tree.stdout.readline().strip() == b"ready"
        light, heavy = (tree_pss_mb(tree.pid) for tree in trees)
        assert 180 < heavy - light < 230
    finally:
        for tree in trees:
            os.killpg(tree.pid, signal.SIGKILL)
            tree.wait()
            assert tree.stdout is not None
            tree.stdout.close()


#: A "server" that starts a worker ignoring SIGTERM, prints the worker's pid, and on SIGTERM ends (``ends``) or
#: ignores it too: a worker left behind by a server that stopped, and a server that hangs.
_SERVER_WITH_STUCK_WORKER = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE)
worker.stdout.readline()
if sys.argv[1] == "ends":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(worker.pid, flush=True)
time.sleep(60)
"""


StuckServerFactory = Callable[[str], tuple[subprocess.Popen[bytes], psutil.Process]]


@pytest.fixture
def stuck_server() -> Iterator[StuckServerFactory]:
    """Starts ``_SERVER_WITH_STUCK_WORKER``; whatever a failing test leaves of it is killed at teardown."""
    started: list[psutil.Process] = []

    def start(on_sigterm: str) -> tuple[subprocess.Popen[bytes], psutil.Process]:
        server = subprocess.Popen([sys.executable, "-c", _SERVER_WITH_STUCK_WORKER, on_sigterm], stdout=subprocess.PIPE)
        assert server.stdout is not None
        worker = psutil.Process(int(server.stdout.readline()))
        server.stdout.close()
        started.extend([psutil.Process(server.pid), worker])
        return server, worker

    yield start
    for process in started:
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.mark.parametrize("on_sigterm", ["ends", "hangs"])
def test_stopping_a_server_leaves_none_of_its_processes(on_sigterm: str, stuck_server: StuckServerFactory) -> None:
    """A server that ends on SIGTERM but leaves a worker, and one that ignores SIGTERM: neither leaves a process
    of its tree running (the bench's next measurement needs the port and the CPU)."""
    server, worker = stuck_server(on_sigterm)
    started = time.monotonic()
    stop_servers((server, None), timeout=1.0)  # None: a server the bench did not get to start
    assert server.returncode == (0 if on_sigterm == "ends" else -signal.SIGKILL)
    assert time.monotonic() - started < 10
    assert _ended(worker, within=10.0)


def test_a_second_ctrl_c_while_waiting_still_kills_every_server(
    monkeypatch: pytest.MonkeyPatch, stuck_server: StuckServerFactory
) -> None:
    """An interrupt during the wait for the servers to stop cuts the wait short, not the kill; it is raised after."""
    server, worker = stuck_server("hangs")
    waits = 0
    wait = subprocess.Popen.wait

    def interrupted_once(self: subprocess.Popen[bytes], timeout: float | None = None) -> int:
        nonlocal waits
        waits += 1
        if waits == 1:
            raise KeyboardInterrupt
        return wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        stop_servers((server,), timeout=30.0)
    assert server.returncode == -signal.SIGKILL
    assert _ended(worker, within=10.0)


def test_a_signal_during_the_kill_acts_after_it_once() -> None:
    """A Ctrl-C or SIGTERM while the servers are being killed is noted, and raised once each after (review: a
    thread mask held it in one thread only, and the kernel gives a process's signal to any other)."""
    before = signal.getsignal(signal.SIGINT)
    steps: list[str] = []

    def killing() -> None:
        with bench_module._signals_held():
            for _ in range(2):  # to the process, as Ctrl-C or kill sends it: any thread may take it
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            steps.append("kill loop finished")  # not cut short

    other_thread_running = threading.Event()
    other_thread = threading.Thread(target=other_thread_running.wait, args=(10,), daemon=True)
    other_thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            killing()
    finally:
        other_thread_running.set()
    assert steps == ["kill loop finished"]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_server_reaped_before_the_kill_is_not_looked_up_again(
    monkeypatch: pytest.MonkeyPatch, stuck_server: StuckServerFactory
) -> None:
    """Once reaped, a server's pid may be another process's: only the tree taken before is killed (review)."""
    server, worker = stuck_server("ends")
    looked_up: list[int] = []
    take_tree = bench_module._process_tree

    def recording(pid: int) -> list[psutil.Process]:
        looked_up.append(pid)
        return take_tree(pid)

    monkeypatch.setattr(bench_module, "_process_tree", recording)
    stop_servers((server,), timeout=5.0)
    assert server.returncode == 0  # it ended on SIGTERM and was reaped before the kill
    assert looked_up == [server.pid]  # before the SIGTERM only
    assert _ended(worker, within=10.0)  # its worker, in that tree, is killed


def test_a_server_stays_in_the_benchs_process_group(tmp_path: Path) -> None:
    """So a signal to the whole job (the terminal's Ctrl-C, `timeout`, a CI runner) reaches it too (review: a
    session of its own outlived a bench stopped that way)."""
    server = start_api_server(_free_port(), 1, f"sqlite:///{tmp_path / 'none.db'}", env=bench_env(tmp_path),
                              folder=tmp_path)  # fmt: skip
    try:
        assert os.getpgid(server.pid) == os.getpgid(0)
    finally:
        stop_servers((server,))
    assert server.returncode is not None


_EXITS_ON_SIGTERM = """
import time
from service.signals import sigterm_exits
with sigterm_exits():
    try:
        print("ready", flush=True)
        time.sleep(30)
    finally:
        print("finally ran", flush=True)
"""


def test_sigterm_runs_the_finally_blocks_while_a_bench_runs() -> None:
    import signal as signals

    before = signals.getsignal(signals.SIGTERM)
    with sigterm_exits():
        assert signals.getsignal(signals.SIGTERM) is not before
    assert signals.getsignal(signals.SIGTERM) is before
    signals.signal(signals.SIGTERM, signals.SIG_IGN)
    try:
        with sigterm_exits():  # a caller ignoring SIGTERM keeps ignoring it
            assert signals.getsignal(signals.SIGTERM) == signals.SIG_IGN
    finally:
        signals.signal(signals.SIGTERM, before)
    child = subprocess.Popen([sys.executable, "-c", _EXITS_ON_SIGTERM], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signals.SIGTERM)
    output, _ = child.communicate(timeout=20)
    assert "finally ran" in output
    assert child.returncode == 128 + signals.SIGTERM


def _ended(process: psutil.Process, within: float) -> bool:
    """Whether ``process`` is gone, or a zombie (killed; reaped whenever its adopter does), within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_cpu_ratio_compares_cpu_per_request_and_is_nan_when_unknown() -> None:
    result = BenchResult(
        api=_figures(1000, cpu_ms=0.5),
        mlflow=_figures(200, cpu_ms=2.0),
        api_fixed_rate=_figures(300),
        mlflow_fixed_rate=None,
        ratio=5.0,
        fixed_rate=300.0,
        model_version="1",
        traffic="demo",
        distinct_requests=1,
        candidates_per_request=44,
        reference_model={"features": 69, "trees": 82, "leaves": 31},
    )
    assert result.cpu_ratio() == 4.0
    assert result.as_dict()["cpu_ratio"] == 4.0
    # 7x is judged on the lower of the two ratios: 8x by req/s from a reference held to one core is 4x by CPU.
    result.ratio = 8.0
    assert result.judged_ratio() == 4.0
    assert result.targets()[">= 7x mlflow serve (req/s and server CPU per request)"] is False
    # 1,000 req/s at 0.5 ms each keeps half a core busy; 200 at 2 ms, 0.4 of one.
    assert result.as_dict()["cores_busy"] == {"api": 0.5, "mlflow": 0.4}
    result.mlflow = _figures(200)
    assert math.isnan(result.cpu_ratio())
    assert result.judged_ratio() == 8.0  # CPU unknown: req/s alone


def test_cpu_figures_count_every_process_and_show_each_ones_cores() -> None:
    # Worker 2 barely worked (it got few connections); process 3 started during the run.
    figures = LoadFigures(requests=1000, errors=0, seconds=2.0, rps=500.0, p50_ms=1.0, p99_ms=2.0)
    with_cpu = _with_cpu(figures, {1: 1.0, 2: 2.0, 4: 7.0}, {1: 3.0, 2: 2.1, 3: 0.5, 4: 7.0})
    assert with_cpu.cpu_ms_per_request == pytest.approx(2.6)
    assert with_cpu.process_cores == [1.0, 0.25, 0.05]  # busiest first; the idle process 4 left out
    assert with_cpu.cores_busy() == pytest.approx(1.3)


def test_stall_probe_sees_a_process_held_off_the_cpu() -> None:
    # SIGSTOP holds the probe off the CPU as a busy machine or a hypervisor would: its next wake-up is that late.
    probe = StallProbe(1.5)  # measuring once it returns
    try:
        time.sleep(0.3)
        os.kill(probe._process.pid, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(probe._process.pid, signal.SIGCONT)
        stalls = probe.result()
    finally:
        probe.stop()
    assert stalls.max_ms >= 150
    assert stalls.over_10_ms >= 1
    assert stalls.over_5_ms >= stalls.over_10_ms
    assert stalls.wakeups > 100  # it woke about every millisecond the rest of the time


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
            return await fixed_rate(f"http://127.0.0.1:{port}/v1/decisions", [(b'{"a":1}', {"X-Key": "k"})],
                                    rate=200, seconds=0.5)  # fmt: skip

    figures = asyncio.run(scenario())
    assert (figures.requests, figures.errors) == ((100, 0) if ok else (0, 100))
    assert seen == [b'{"a":1}'] * 120  # 20 warm-up requests first
    assert figures.seconds < 5


def test_fixed_rate_sends_the_requests_in_turn() -> None:
    seen: list[bytes] = []
    requests = [(b'{"n":1}', {"X-Key": "a"}), (b'{"n":22}', {"X-Key": "b"}), (b'{"n":333}', {"X-Key": "c"})]

    async def scenario() -> LoadFigures:
        server = await _serve_http(200, seen)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await fixed_rate(f"http://127.0.0.1:{port}/v1/decisions", requests, rate=200, seconds=0.2)

    figures = asyncio.run(scenario())
    assert figures.requests == 40
    assert seen == [body for body, _ in requests] * 20  # 20 warm-up requests, then 40, one after the other


class _Recorder(BaseHTTPRequestHandler):
    """Answers every POST with 200, or with 422 when the body says ``"refuse"``; keeps (Authorization, body)."""

    seen: list[tuple[str, bytes]]
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.headers.get("Authorization", ""), body))
        status = 422 if b"refuse" in body else 200
        answer = b'{"detail":"refused"}' if status == 422 else b'{"ok":true}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    seen: list[tuple[str, bytes]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/decisions", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make bench-tools installs it)")
def test_wrk_sends_every_request_with_its_own_headers(
    recorder: tuple[str, list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    url, seen = recorder
    requests = [(json.dumps({"n": n, "text": 'quote " and \\ slash'}).encode(), {"Authorization": f"Bearer k{n}"})
                for n in range(3)]  # fmt: skip
    figures = wrk_closed_loop(url, requests, connections=2, seconds=1, folder=tmp_path)
    assert figures.requests > 0
    assert figures.errors == 0
    assert {auth for auth, _ in seen} == {"Bearer k0", "Bearer k1", "Bearer k2"}
    assert {(auth, body) for auth, body in seen} == {(headers["Authorization"], body) for body, headers in requests}


def test_a_request_not_answered_200_stops_the_bench_naming_it(recorder: tuple[str, list[tuple[str, bytes]]]) -> None:
    url, seen = recorder
    traffic = Traffic("mixed", ((b'{"ok":1}', {}), (b'{"refuse":1}', {})), candidates_per_request=2.0)
    with pytest.raises(UnansweredRequestError, match=r"mixed request 1 got 422: .*refused"):
        _check_answered(url, traffic)
    _check_answered(url, Traffic("demo", ((b'{"ok":1}', {}),), candidates_per_request=2.0))
    assert len(seen) == 3


def test_mixed_traffic_is_valid_varied_requests_with_their_merchants_keys() -> None:
    traffic = mixed_traffic(count=60, seed=3)
    merchants = load_config(BENCH_CONFIG).merchants
    requests = [DecisionRequest.model_validate_json(body) for body, _ in traffic.requests]
    assert 30 <= len(requests) <= 60
    assert len({request.order_id for request in requests}) == len(requests)
    for request, (_, headers) in zip(requests, traffic.requests, strict=True):
        assert request.merchant_id in merchants
        assert headers["Authorization"] == f"Bearer {bench_key(request.merchant_id)}"
        assert hashlib.sha256(bench_key(request.merchant_id).encode()).hexdigest() == (
            merchants[request.merchant_id].api_key_sha256
        )
    assert len({request.merchant_id for request in requests}) >= 3
    assert len({request.payment.payment_method for request in requests}) >= 2
    assert any(len(request.history.attempts) > 1 for request in requests)
    assert traffic.candidates_per_request > 1


def test_the_generators_collector_is_off_while_it_measures_and_on_again_after() -> None:
    from service.api.bench import _collector_paused, _run_timed

    async def measured() -> LoadFigures:
        assert not gc.isenabled()  # a pass over the bench's own objects would count as server latency
        return _figures(1)

    assert _run_timed(measured()).requests == 1
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("the generator failed")
    assert gc.isenabled()


def test_wait_idle_waits_for_a_busy_process_tree_to_settle() -> None:
    from service.api.bench import wait_idle

    burn = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    busy = subprocess.Popen([sys.executable, "-c", burn.format(seconds=60)])
    settling = subprocess.Popen([sys.executable, "-c", burn.format(seconds=0.6)])
    try:
        assert not wait_idle(busy.pid, interval=0.2, timeout=1.0)
        assert wait_idle(settling.pid, interval=0.2, timeout=20.0)
        assert tree_cpu_seconds(settling.pid) >= 0.5  # it returned only once the burn was over
    finally:
        for child in (busy, settling):
            child.kill()
            child.wait()


def test_the_fixed_rate_pool_does_not_reuse_a_connection_the_server_may_have_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.api import bench

    monkeypatch.setattr(bench, "IDLE_REUSE_SECONDS", 0.1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # answer, and close a connection idle for 0.3 s (as uvicorn does after 5 s)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.3)
                length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                             .split(b":")[1])  # fmt: skip
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def scenario() -> list[int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            pool = bench._KeepAlivePool(f"http://127.0.0.1:{port}/v1/decisions", [(b"{}", {})])
            try:
                first = await pool.post()
                await asyncio.sleep(0.5)  # the server has closed the connection by now
                return [first, await pool.post()]
            finally:
                await pool.close()

    assert asyncio.run(scenario()) == [200, 200]


def test_the_constant_app_reads_the_body_and_answers_a_decisions_size() -> None:
    import httpx

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=constant_app), base_url="http://x") as client:
            return await client.post("/v1/decisions", content=b'{"merchant_id": "m"}')

    response = asyncio.run(ask())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert 1_000 < len(response.content) < 1_500  # about a decision's size
    assert response.json()["decision_id"].startswith("dec_")


def test_the_server_floor_is_the_cpu_of_uvicorn_answering_a_constant(tmp_path: Path) -> None:
    traffic = mixed_traffic(count=10, seed=3)

    def closed(url: str, requests: list[tuple[bytes, dict[str, str]]]) -> LoadFigures:
        return asyncio.run(closed_loop(url, requests, concurrency=2, seconds=1.0, max_requests=300))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    figures = server_floor(list(traffic.requests), workers=1, closed=closed, env=env, folder=tmp_path)
    assert figures.requests > 0
    assert figures.errors == 0
    assert 0 < figures.cpu_ms_per_request < 50


@pytest.mark.parametrize("traffic", [mixed_traffic(count=10, seed=3), demo_traffic()], ids=["mixed", "demo"])
def test_the_in_process_costs_decide_the_traffic_as_the_server_would(traffic: Traffic, tmp_path: Path) -> None:
    # (The demo request is a file of several lines: bodies split by line failed on it.)
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")} | {
        "PYTHONPATH": root,
        "WINBACK_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
        "WINBACK_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}",  # no champion: rules-only
        "WINBACK_CONFIG_PATH": str(BENCH_CONFIG),
    }
    costs = _measure_in_process(list(traffic.requests), env=env, folder=tmp_path, passes=3)
    assert costs.model_version == "rules-only"  # the model that decided is reported, and checked by the bench
    # Both are measured (CPU time, so positive). Not compared with each other: the request path holds the decision,
    # but each figure is the best of a few passes on a shared machine, and one pass can beat the other's best.
    assert costs.decide_ms > 0
    assert costs.handling_ms > 0
    # Every request was decided and logged as the server logs it (the log goes to a file, as the server's).
    log_lines = (tmp_path / "in-process.log").read_text().splitlines()
    decided = [json.loads(line) for line in log_lines if '"message":"decision"' in line]
    assert len(decided) >= len(traffic.requests) * 3  # warm-up and two passes
    assert {line["model_version"] for line in decided} == {"rules-only"}


def test_a_failed_in_process_measurement_names_its_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")} | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "WINBACK_CONFIG_PATH": str(tmp_path / "missing.yaml"),
    }
    # Named by the child's own error, not by the last line of a traceback.
    with pytest.raises(RuntimeError, match=r"the in-process measurement failed \(exit code 1\): ConfigError: "):
        _measure_in_process([(b"{}", {})], env=env, folder=tmp_path, passes=1)


def test_the_cost_breakdown_is_printed_or_why_it_is_not(capsys: pytest.CaptureFixture[str]) -> None:
    from service.api.bench import CostBreakdown, _print

    base = BenchResult(
        api=_figures(100, 1.0), mlflow=_figures(40, 2.5), api_fixed_rate=_figures(300), mlflow_fixed_rate=None,
        ratio=2.5, fixed_rate=300.0, model_version="7", traffic="mixed", distinct_requests=3,
        candidates_per_request=40.0, reference_model={}, worker_rss_mb=[300.0],
    )  # fmt: skip
    _print(replace(base, costs=CostBreakdown(decide_ms=0.43, handling_ms=0.62, server_floor_ms=0.024, passes=8)))
    printed = " ".join(capsys.readouterr().out.split())
    assert "decide() alone 0.43 ms" in printed
    assert "0.62 ms, in process with model 7, best of 8 passes" in printed
    assert "answering a constant 0.024 ms of server CPU per request" in printed
    _print(replace(base, costs_error="RuntimeError: the in-process run decided with model rules-only, the API with 7"))
    printed = " ".join(capsys.readouterr().out.split())
    assert "where the API's CPU per request goes: not measured (RuntimeError: the in-process run decided" in printed


def test_a_result_names_the_software_it_was_measured_with(capsys: pytest.CaptureFixture[str]) -> None:
    import platform
    from importlib import metadata

    from service.api.bench import MEASURED_PACKAGES, _print, software_versions

    versions = software_versions()
    assert list(versions) == ["python", *MEASURED_PACKAGES]
    assert versions["python"] == platform.python_version()
    assert versions["mlflow"] == metadata.version("mlflow")
    assert versions["lightgbm"] == metadata.version("lightgbm")
    assert software_versions(["no-such-package-winback"])["no-such-package-winback"] == "not installed"
    result = BenchResult(
        api=_figures(100, 1.0), mlflow=_figures(40, 2.5), api_fixed_rate=_figures(300), mlflow_fixed_rate=None,
        ratio=2.5, fixed_rate=300.0, model_version="7", traffic="mixed", distinct_requests=3,
        candidates_per_request=40.0, reference_model={}, worker_rss_mb=[300.0],
        software={"python": "3.11.7", "mlflow": "3.17.2", "pandas": "2.3.3"},
    )  # fmt: skip
    _print(result)
    assert "software: python 3.11.7, mlflow 3.17.2, pandas 2.3.3" in " ".join(capsys.readouterr().out.split())
    assert result.as_dict()["software"] == {"python": "3.11.7", "mlflow": "3.17.2", "pandas": "2.3.3"}


def test_memory_that_could_not_be_read_prints_a_dash_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    # The API bench printed "API worker RSS (MB): nan" and "(PSS, MB): API nan, mlflow serve nan" for a figure
    # /proc did not give; every other table shows a missing figure as "-".
    from service.api.bench import _print

    result = BenchResult(
        api=_figures(100, 1.0), mlflow=_figures(40, 2.5), api_fixed_rate=_figures(300), mlflow_fixed_rate=None,
        ratio=2.5, fixed_rate=300.0, model_version="7", traffic="mixed", distinct_requests=1,
        candidates_per_request=40.0, reference_model={}, worker_rss_mb=[312.4, math.nan],
        api_tree_pss_mb=640.2, mlflow_tree_pss_mb=math.nan,
    )  # fmt: skip
    _print(result)
    printed = " ".join(capsys.readouterr().out.split())
    assert "nan" not in printed.lower().split(), printed
    assert "(1 distinct request)" in printed
    assert "API worker RSS (MB): 312, - (-: the worker's /proc/<pid>/status had no VmRSS line)" in printed
    assert "(PSS, MB): API 640, mlflow serve - (-: the server's /proc/<pid>/smaps_rollup could not be read)" in printed


@pytest.mark.parametrize("worker_rss_mb", [[math.nan, 300.0], [300.0, math.nan], [], [300.0, 401.0]])
def test_the_memory_target_is_met_only_when_every_worker_was_measured_under_it(worker_rss_mb: list[float]) -> None:
    """max() over a list holding NaN depends on the order (max([300, nan]) is 300): a worker not measured passed."""
    result = BenchResult(
        api=_figures(100, 1.0), mlflow=_figures(40, 2.5), api_fixed_rate=_figures(300), mlflow_fixed_rate=None,
        ratio=2.5, fixed_rate=300.0, model_version="7", traffic="mixed", distinct_requests=1,
        candidates_per_request=40.0, reference_model={}, worker_rss_mb=worker_rss_mb,
    )  # fmt: skip
    assert result.targets()["each worker < 400 MB RSS"] is False
    assert replace(result, worker_rss_mb=[300.0, 399.0]).targets()["each worker < 400 MB RSS"] is True
