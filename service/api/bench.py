"""Benchmark: the decision API (2 uvicorn workers) against ``mlflow models serve`` on a LightGBM model of similar
size, driven by the same load generators on loopback, in one run.

Figures: closed-loop throughput (req/s, p50, p99; wrk when installed, else an httpx client) and each server's
CPU time per request (its whole process tree), their ratios, p99 at a fixed open-loop rate (300 req/s by
default, latency counted from each request's scheduled send time), and each API worker's RSS.
Targets (ISSUE): >= 1,000 decisions/s, p99 < 10 ms at 300 req/s, >= 7x mlflow serve, each worker < 400 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import orjson

from model import datafiles

#: The decision request of the benchmark: the shipped demo request (CONTRACT.md section 2, merchant m_us_saas).
DEMO_REQUEST_FILE = datafiles.DEMO_REQUEST_FILE
BENCH_MERCHANT = "m_us_saas"
BENCH_KEY = f"wb_demo_{BENCH_MERCHANT}"


@dataclass
class LoadFigures:
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    #: CPU time the server's whole process tree spent per answered request (user + system), or NaN if unknown.
    #: Unlike req/s it does not depend on how much of the machine the load generator takes.
    cpu_ms_per_request: float = float("nan")


@dataclass
class BenchResult:
    api: LoadFigures
    mlflow: LoadFigures
    api_fixed_rate: LoadFigures
    mlflow_fixed_rate: LoadFigures | None
    ratio: float
    fixed_rate: float
    model_version: str
    candidates_per_request: int
    reference_model: dict[str, int]
    worker_rss_mb: list[float] = field(default_factory=list)

    def targets(self) -> dict[str, bool]:
        """Each ISSUE target and whether this run met it."""
        return {
            ">= 1000 decisions/s": self.api.rps >= 1000,
            "p99 < 10 ms at fixed rate": self.api_fixed_rate.p99_ms < 10.0,
            ">= 7x mlflow serve": self.ratio >= 7.0,
            "each worker < 400 MB RSS": bool(self.worker_rss_mb) and max(self.worker_rss_mb) < 400,
        }

    def cpu_ratio(self) -> float:
        """Server CPU per mlflow request over server CPU per decision (NaN when either is unknown)."""
        api, reference = self.api.cpu_ms_per_request, self.mlflow.cpu_ms_per_request
        return round(reference / api, 2) if api > 0 and reference > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able figures."""
        return asdict(self) | {"targets": self.targets(), "cpu_ratio": self.cpu_ratio()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1e3


def _figures(latencies: list[float], errors: int, seconds: float) -> LoadFigures:
    latencies.sort()
    return LoadFigures(
        requests=len(latencies),
        errors=errors,
        seconds=round(seconds, 3),
        rps=round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(_percentile(latencies, 0.50), 3),
        p99_ms=round(_percentile(latencies, 0.99), 3),
    )


async def closed_loop(
    url: str, body: bytes, headers: dict[str, str], *, concurrency: int, seconds: float, max_requests: int
) -> LoadFigures:
    """``concurrency`` clients sending back to back for ``seconds`` (at most ``max_requests`` in all)."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=30) as client:
        for _ in range(min(concurrency, 50)):  # warm the connections and the server's caches
            await client.post(url, content=body)
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                sent = time.perf_counter()
                try:
                    response = await client.post(url, content=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _figures(latencies, errors, elapsed)


_WRK_LATENCY = {"50%": "p50", "99%": "p99"}
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_closed_loop(
    url: str, body: bytes, headers: dict[str, str], *, connections: int, seconds: float, folder: Path
) -> LoadFigures:
    """Closed loop with wrk (C, one thread): a load generator that leaves the CPU to the servers under test.

    The Python generator above tops out near 700 req/s on this 2-core box, below what the servers answer.
    """
    script = folder / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(int(seconds), 1)}s", "--latency", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    values: dict[str, float] = {}
    requests = errors = 0
    for raw in out.splitlines():
        line = raw.strip()
        parts = line.split()
        if parts and parts[0] in _WRK_LATENCY and len(parts) == 2:
            number = parts[1].rstrip("usm")
            unit = parts[1][len(number) :]
            values[_WRK_LATENCY[parts[0]]] = float(number) * _WRK_UNITS.get(unit, 1.0)
        elif "requests in" in line:
            requests = int(parts[0])
        elif line.startswith("Non-2xx or 3xx responses:"):
            errors += int(parts[-1])
        elif line.startswith("Socket errors:"):
            errors += sum(int(p.rstrip(",")) for p in parts if p.rstrip(",").isdigit())
        elif line.startswith("Requests/sec:"):
            values["rps"] = float(parts[-1])
    return LoadFigures(
        requests=requests,
        errors=errors,
        seconds=round(seconds, 2),
        rps=round(values.get("rps", 0.0), 1),
        p50_ms=round(values.get("p50", float("nan")), 3),
        p99_ms=round(values.get("p99", float("nan")), 3),
    )


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _KeepAlivePool:
    """Pre-serialised HTTP/1.1 POSTs over keep-alive loopback connections, for the open-loop generator.

    httpx spends ~1 ms of Python per request; at a fixed rate on a 2-core box that CPU is taken from the
    server under test and its own queueing shows up as server latency. This pool writes the same request bytes
    each time and reads the status line, the headers and ``Content-Length`` bytes: tens of microseconds.
    """

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        parts = httpx.URL(url)
        self.host, self.port = parts.host, parts.port or 80
        lines = [f"POST {parts.raw_path.decode()} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def post(self) -> int:
        """Send the request on an idle connection (a new one if none is idle); the response's status code."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened.append(writer)
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        self.idle.append((reader, writer))
        return status

    async def close(self) -> None:
        for writer in self.opened:
            writer.close()
        for writer in self.opened:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def fixed_rate(url: str, body: bytes, headers: dict[str, str], *, rate: float, seconds: float) -> LoadFigures:
    """Open loop: one request every 1/rate s whatever the answers do; latency from the scheduled send time."""
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    pool = _KeepAlivePool(url, body, headers)
    try:
        for _ in range(20):
            await pool.post()

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                ok = await asyncio.wait_for(pool.post(), timeout=30) == 200
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors += 1

        started = time.perf_counter()
        tasks = []
        for index in range(total):
            scheduled = started + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    finally:
        await pool.close()
    return _figures(latencies, errors, elapsed)


def _run_timed(generator: Coroutine[Any, Any, LoadFigures]) -> LoadFigures:
    """Run a load generator on uvloop (uvicorn's own loop, installed with it): its timers wake on time and its
    per-request overhead is lower, so less of the generator's own lateness is counted as server latency."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        return asyncio.run(generator)
    figures: LoadFigures = uvloop.run(generator)
    return figures


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in _children(parent)]
        found += children
        frontier = children
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every process below it, so far (live processes only)."""
    ticks = 0
    for member in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def _with_cpu(figures: LoadFigures, cpu_seconds: float) -> LoadFigures:
    per_request = cpu_seconds / figures.requests * 1e3 if figures.requests else float("nan")
    return replace(figures, cpu_ms_per_request=round(per_request, 3))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _worker_rss(server_pid: int) -> list[float]:
    """RSS of the uvicorn workers (the server's python children, not its multiprocessing tracker)."""
    rss = []
    for child in _children(server_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            rss.append(_rss_mb(child))
    return rss or [_rss_mb(server_pid)]


def _reference_model(folder: Path, n_features: int, n_trees: int, num_leaves: int) -> Path:
    """A LightGBM binary model of the given size on random data, saved as an MLflow model."""
    import lightgbm as lgb
    import mlflow.lightgbm
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(4000, n_features)), columns=[f"f{i}" for i in range(n_features)])
    y = (x.iloc[:, 0] + rng.normal(size=len(x)) > 0).astype(int)
    booster = lgb.train(
        {
            "objective": "binary",
            "num_leaves": num_leaves,
            "verbose": -1,
            "num_threads": 1,
            "min_data_in_leaf": 5,
        },
        lgb.Dataset(x, y),
        num_boost_round=n_trees,
    )
    target = folder / "reference_model"
    mlflow.lightgbm.save_model(booster, str(target))
    return target


def _model_size(tracking_uri: str | None) -> tuple[str, dict[str, int]]:
    """The champion's version and its retry booster's size; a default size when there is no champion."""
    size = {"features": 70, "trees": 200, "leaves": 31}
    if tracking_uri is None:
        return "rules-only", size
    from model import registry

    loaded = registry.load_champion(tracking_uri)
    if loaded is None:
        return "rules-only", size
    bundle, version = loaded
    boosters = [b for b in (bundle.retry_booster, bundle.retarget_booster) if b is not None]
    trees = [tree for b in boosters for tree in b.dump_model(num_iteration=-1).get("tree_info", [])]
    leaves = max((int(tree.get("num_leaves", 2)) for tree in trees), default=31)
    return version, {
        "features": max(b.num_feature() for b in boosters),
        "trees": max(len(trees), 1),
        "leaves": max(leaves, 2),  # LightGBM needs two leaves to train the stand-in
    }


def _candidate_count() -> int:
    from model.catalog import load_catalog
    from model.merchant_config import MerchantConfig
    from model.requests import DecisionRequest
    from model.rules import build_context, enumerate_candidates, permitted

    request = DecisionRequest.model_validate_json(DEMO_REQUEST_FILE.read_bytes())
    merchant = MerchantConfig(api_key_sha256="0" * 64, connectors=["stripe", "adyen", "cybersource"])
    context = build_context(request, merchant, load_catalog())
    return len(permitted(context, enumerate_candidates(context))) + 1


def run_bench(
    *,
    tracking_uri: str | None = None,
    workers: int = 2,
    seconds: float = 10.0,
    concurrency: int = 32,
    max_requests: int = 50_000,
    rate: float = 300.0,
    rate_seconds: float = 5.0,
    print_table: bool = True,
) -> BenchResult:
    """Run the whole benchmark (both servers started and stopped here) and return the figures."""
    model_version, size = _model_size(tracking_uri)
    rows = _candidate_count()
    with tempfile.TemporaryDirectory(prefix="winback-bench-") as tmp:
        folder = Path(tmp)
        config = folder / "merchants.yaml"
        digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
        config.write_text(
            f'merchants:\n  {BENCH_MERCHANT}:\n    api_key_sha256: "{digest}"\n'
            "    connectors: [stripe, adyen, cybersource]\n",
            encoding="utf-8",
        )
        reference = _reference_model(folder, size["features"], size["trees"], size["leaves"])
        api_port, mlflow_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")}
        env |= {"WINBACK_DATABASE_URL": f"sqlite:///{folder / 'winback.db'}", "OMP_NUM_THREADS": "1"}
        code = (
            "from service.api.server import run; "
            f"run('127.0.0.1', {api_port}, {workers}, {str(config)!r}, {tracking_uri or f'sqlite:///{folder}/none.db'!r})"
        )
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        # mlflow serve execs `uvicorn` by name: the virtualenv's bin folder must be on PATH.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        api = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        serve = subprocess.Popen(
            [mlflow_bin, "models", "serve", "-m", str(reference), "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(mlflow_port), "-w", str(workers)],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_http(f"http://127.0.0.1:{api_port}/healthz", api)
            _wait_http(f"http://127.0.0.1:{mlflow_port}/ping", serve)
            api_url = f"http://127.0.0.1:{api_port}/v1/decisions"
            api_body = DEMO_REQUEST_FILE.read_bytes()
            api_headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
            ml_url = f"http://127.0.0.1:{mlflow_port}/invocations"
            columns = [f"f{i}" for i in range(size["features"])]
            ml_body = orjson.dumps(
                {
                    "dataframe_split": {
                        "columns": columns,
                        "data": [[0.1 * (i % 7)] * len(columns) for i in range(rows)],
                    }
                }
            )
            ml_headers = {"Content-Type": "application/json"}
            use_wrk = shutil.which("wrk") is not None

            def closed(url: str, body: bytes, headers: dict[str, str]) -> LoadFigures:
                if use_wrk:
                    return wrk_closed_loop(url, body, headers, connections=concurrency, seconds=seconds, folder=folder)
                return asyncio.run(
                    closed_loop(url, body, headers, concurrency=concurrency, seconds=seconds, max_requests=max_requests)
                )

            cpu_before = tree_cpu_seconds(api.pid)
            api_figures = closed(api_url, api_body, api_headers)
            api_figures = _with_cpu(api_figures, tree_cpu_seconds(api.pid) - cpu_before)
            api_rate = _run_timed(fixed_rate(api_url, api_body, api_headers, rate=rate, seconds=rate_seconds))
            rss = _worker_rss(api.pid)
            cpu_before = tree_cpu_seconds(serve.pid)
            ml_figures = closed(ml_url, ml_body, ml_headers)
            ml_figures = _with_cpu(ml_figures, tree_cpu_seconds(serve.pid) - cpu_before)
            ml_rate = None
            if ml_figures.rps >= rate:  # a fixed rate above what it sustains only measures its queue
                ml_rate = _run_timed(fixed_rate(ml_url, ml_body, ml_headers, rate=rate, seconds=rate_seconds))
        finally:
            for process in (api, serve):
                process.terminate()
            for process in (api, serve):
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
    result = BenchResult(
        api=api_figures,
        mlflow=ml_figures,
        api_fixed_rate=api_rate,
        mlflow_fixed_rate=ml_rate,
        ratio=round(api_figures.rps / ml_figures.rps, 2) if ml_figures.rps else float("inf"),
        fixed_rate=rate,
        model_version=model_version,
        candidates_per_request=rows,
        reference_model=size,
        worker_rss_mb=rss,
    )
    if print_table:
        _print(result)
    return result


def _print(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decision API (model {result.model_version}) vs mlflow models serve")
    for column in ("server", "mode", "requests", "errors", "req/s", "p50 ms", "p99 ms", "CPU ms/request"):
        table.add_column(column)
    rows = [
        ("winback API", "closed loop", result.api),
        ("winback API", f"{result.fixed_rate:.0f} req/s", result.api_fixed_rate),
        ("mlflow serve", "closed loop", result.mlflow),
        ("mlflow serve", f"{result.fixed_rate:.0f} req/s", result.mlflow_fixed_rate),
    ]
    for server, mode, figures in rows:
        if figures is None:
            table.add_row(server, mode, "-", "-", "not run: below the rate in closed loop", "-", "-", "-")
            continue
        table.add_row(
            server, mode, str(figures.requests), str(figures.errors), f"{figures.rps:.0f}",
            f"{figures.p50_ms:.2f}", f"{figures.p99_ms:.2f}",
            "-" if math.isnan(figures.cpu_ms_per_request) else f"{figures.cpu_ms_per_request:.2f}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"throughput ratio API/mlflow: {result.ratio:.1f}x; candidates scored per request: "
        f"{result.candidates_per_request}; reference model {result.reference_model}"
    )
    if not math.isnan(result.cpu_ratio()):
        console.print(f"server CPU per request, mlflow/API: {result.cpu_ratio():.1f}x (closed loop, process trees)")
        console.print(
            f"7x mlflow serve needs at most {result.mlflow.cpu_ms_per_request / 7:.2f} ms of server CPU per decision "
            f"(mlflow's {result.mlflow.cpu_ms_per_request:.2f} / 7); measured {result.api.cpu_ms_per_request:.2f}"
        )
    console.print(f"API worker RSS (MB): {', '.join(f'{rss:.0f}' for rss in result.worker_rss_mb)}")
    for target, met in result.targets().items():
        console.print(f"{'met ' if met else 'MISSED'} {target}")


if __name__ == "__main__":  # pragma: no cover - manual entry point; `make bench` calls run_bench
    run_bench(tracking_uri=sys.argv[1] if len(sys.argv) > 1 else None)
