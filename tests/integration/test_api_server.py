"""The decision API as a real server (uvicorn in a subprocess) against a real MLflow store in a temp dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from model import registry, registry_client
from model.requests import Decision
from model.training import train
from service.api.accept import try_flock
from service.api.fastpath import MAX_REQUEST_BODY
from service.api.mirror import (
    OWNER_LOCK,
    STATE_FILE,
    MirrorError,
    MirrorSource,
    RegistryMirror,
    mirrored_registry,
    version_folder,
)
from service.api.model_holder import ModelHolder
from tests.factories import make_history_frames, make_request, write_merchant_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer wb_demo_m_demo"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _register(store: str, bundle_dir: Path) -> str:
    import mlflow

    experiment_id = registry.ensure_experiment(store)
    with registry.tracking(store), mlflow.start_run(experiment_id=experiment_id) as run:
        run_id = run.info.run_id
    return registry.register_bundle(bundle_dir, run_id, tracking_uri=store, alias=None)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A MLflow store holding versions 1 and 2 of ``winback`` (the same small bundle), champion -> 1."""
    folder = tmp_path_factory.mktemp("api-mlflow")
    attempts, nudges = make_history_frames(600, seed=3)
    bundle_dir = train(attempts, nudges, seed=0, max_rounds=20, evaluate_unseen_codes=False).bundle.save(
        folder / "bundle"
    )
    store = f"sqlite:///{folder / 'mlflow.db'}"
    assert [_register(store, bundle_dir), _register(store, bundle_dir)] == ["1", "2"]
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    return store, folder


class Server:
    """``winback serve`` started through service.api.server.run in a subprocess, on a free port."""

    def __init__(self, tmp_path: Path, tracking_uri: str, workers: int = 2) -> None:
        config = write_merchant_config(tmp_path / "merchants.yaml", ["m_demo", "m_other"])
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WINBACK_") and k != "MLFLOW_TRACKING_URI"},
            "WINBACK_DATABASE_URL": f"sqlite:///{tmp_path / 'winback.db'}",
            "WINBACK_MODEL_POLL_SECONDS": "0.5",
            "PYTHONPATH": str(ROOT),
            "TMPDIR": str(tmp_path),  # the folders a server killed outright leaves go with the test's
        }
        code = (
            "from service.api.server import run; "
            f"run('127.0.0.1', {self.port}, {workers}, {str(config)!r}, {tracking_uri!r})"
        )
        self.log = (tmp_path / "server.log").open("w+b")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy after {timeout} s:\n{self.output()}")

    def output(self, last: int | None = 4000) -> str:
        """The server's output: its last ``last`` characters (None: all of it)."""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return text if last is None else text[-last:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server must not hang the suite
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type[Server] | object]:
    started: list[Server] = []

    def start(tracking_uri: str, workers: int = 2) -> Server:
        server = Server(tmp_path, tracking_uri, workers)
        started.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in started:
        server.stop()


def _body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = json.loads(make_request(**overrides).model_dump_json())
    return body


def test_real_server_serves_the_champion_and_follows_it_under_load(
    two_versions: tuple[str, Path], server_factory: object
) -> None:
    store, _ = two_versions
    server = server_factory(store)  # type: ignore[operator]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["model_version"] == "1"
        first = client.post("/v1/decisions", json=_body())
        assert first.status_code == 200, first.text
        assert Decision.model_validate(first.json()).model_version == "1"
        unseen = client.post(
            "/v1/decisions",
            json=_body(
                payment={"payment_method": "crypto_voucher", "card_network": None},
                failure={"connector": "newpay", "error_code": "ZZ_NEW", "network_decline_code": None},
                available_connectors=["newpay"],
            ),
        )
        assert unseen.status_code == 200, unseen.text
        bad = client.post("/v1/decisions", json={**_body(), "currency": "RUPEES"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "currency"

    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
            while not stop.is_set():
                response = client.post("/v1/decisions", json=_body())
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.append(response.json()["model_version"])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(0.5)
        registry.set_alias(registry.CHAMPION, "2", tracking_uri=store)
        moved_at = time.monotonic()
        while time.monotonic() - moved_at < 30 and versions[-20:].count("2") < 20:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        sender.join()
    assert statuses
    assert set(statuses) == {200}, server.output()
    assert versions[0] == "1"
    assert versions[-1] == "2"
    assert set(versions) == {"1", "2"}


def test_empty_registry_answers_rules_only_and_is_not_ready(mlflow_store: str, server_factory: object) -> None:
    server = server_factory(mlflow_store, 1)  # type: ignore[operator]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
        assert client.get("/readyz").status_code == 503
        response = client.post("/v1/decisions", json=_body())
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "rules-only"
        assert client.post("/v1/decisions", json=_body(), headers={"Authorization": ""}).status_code == 401
        outcome = {
            "decision_id": response.json()["decision_id"],
            "order_id": "ord_8KQ2",
            "status": "failure",
            "occurred_at": "2026-11-02T10:15:00Z",
            "error_code": "card_declined",
        }
        assert client.post("/v1/outcomes", json=outcome).status_code == 200
        assert client.post("/v1/outcomes", json=outcome).json() == client.post("/v1/outcomes", json=outcome).json()
        assert "winback_decisions_total" in client.get("/metrics").text
        # A body sent without Content-Length (chunked) is bounded as it arrives: within the limit it is an
        # ordinary request, past it a 413 once the limit is passed, not a body read whole into the worker.
        small = json.dumps(_body()).encode()
        json_type = {"Content-Type": "application/json"}
        chunked = client.post("/v1/decisions", content=iter([small[:40], small[40:]]), headers=json_type)
        assert chunked.status_code == 200, chunked.text
        megabyte = b" " * (1024 * 1024)
        oversized = client.post(
            "/v1/outcomes",
            content=iter([b"{", *([megabyte] * (MAX_REQUEST_BODY // len(megabyte))), b"}"]),
            headers=json_type,
        )
        assert oversized.status_code == 413, oversized.text


def _workers_of(server: Server, count: int, started: int) -> list[psutil.Process]:
    """The server's ``count`` worker processes, once ``started`` workers in all have finished their start."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = [child for child in psutil.Process(server.process.pid).children() if _is_worker(child)]
        if len(workers) == count and server.output().count("Application startup complete") >= started:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"no {count} workers after 60 s:\n{server.output()}")


def _is_worker(process: psutil.Process) -> bool:
    """Whether ``process`` is a worker uvicorn started (not the resource tracker), not ended yet."""
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile (a zombie has no command line)
        return False


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (an ended one no longer reaped by the test's own child is a zombie)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def test_workers_end_with_a_server_killed_outright_and_free_its_port(mlflow_store: str, server_factory: object) -> None:
    """`winback serve` killed outright (SIGKILL, the OOM killer) could not stop its workers: they kept the port, so
    the restarted command could not bind it, and served on with a model that no longer changed (the registry
    mirror was the dead command's). Each worker, one that uvicorn started in place of a dead one too, now ends
    with the command's process, by its graceful stop (uvicorn's own, on the kernel's SIGTERM)."""
    server = server_factory(mlflow_store, 2)  # type: ignore[operator]
    first = _workers_of(server, 2, started=2)
    first[0].kill()  # uvicorn starts another in its place, from the same (main) thread
    workers = _workers_of(server, 2, started=3)
    assert {worker.pid for worker in workers} & {worker.pid for worker in first} == {first[1].pid}
    leftovers = psutil.Process(server.process.pid).children(recursive=True)  # the resource tracker too
    try:
        server.process.kill()
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _running(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _running(workers) == [], f"workers outlive the server:\n{server.output()}"
        for worker in workers:  # the graceful stop: the lifespan's shutdown ran
            assert f"Finished server process [{worker.pid}]" in server.output()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds its port
            sock.bind(("127.0.0.1", server.port))
            sock.listen()
    finally:
        for process in leftovers:
            with contextlib.suppress(psutil.Error):  # ended (or its pid another process's: psutil refuses it)
                process.kill()


# The registry mirror of `winback serve` (service/api/mirror.py): one MLflow client per server, workers read files.


def test_the_mirror_follows_the_champion_and_a_worker_loads_it_without_mlflow(
    two_versions: tuple[str, Path], tmp_path: Path
) -> None:
    store, _ = two_versions
    folder = tmp_path / "mirror"
    folder.mkdir()
    mirror = RegistryMirror(folder, store, poll_seconds=1.0)
    source = MirrorSource(folder, poll_seconds=1.0)
    with pytest.raises(MirrorError, match="has not answered yet"):
        source.champion_version()
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    mirror.check()
    assert source.champion_version() == "1"
    registry.set_alias(registry.CHAMPION, "2", tracking_uri=store)
    mirror.check()
    assert source.champion_version() == "2"
    assert sorted(path.name for path in folder.iterdir()) == [STATE_FILE, "version-1", "version-2"]
    # A worker's load reads the bundle alone: MLflow (and its tracking store) stays out of the worker's memory.
    code = (
        "import sys; from pathlib import Path; from service.api.mirror import MirrorSource; "
        f"scorer = MirrorSource(Path({str(folder)!r}), 1.0).load('2'); "
        "print(scorer.version, sorted(name for name in sys.modules if name.split('.')[0] == 'mlflow'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["2", "[]"]


def test_a_registry_that_fails_keeps_the_last_version_and_says_why(
    two_versions: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = two_versions
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    folder = tmp_path / "mirror"
    folder.mkdir()
    mirror = RegistryMirror(folder, store, poll_seconds=1.0)
    mirror.check()
    # The registry goes away: a tracking server that refuses connections (no retries, so the test is quick).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mirror.tracking_uri = f"http://127.0.0.1:{_free_port()}"
    mirror.check()
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["version"] == "1"
    assert "Connection refused" in state["error"] or "ConnectionError" in state["error"], state
    with pytest.raises(MirrorError) as refused:
        MirrorSource(folder, poll_seconds=1.0).champion_version()
    assert str(refused.value) == state["error"]
    assert (folder / "version-1").is_dir()  # what the workers serve stays loadable
    # A worker started now (uvicorn replacing one that died) serves that version too, and says why it may be old.
    holder = ModelHolder(MirrorSource(folder, poll_seconds=1.0))
    assert holder.refresh() is True
    assert (holder.current.version, holder.last_error) == (
        "1",
        f"model registry unavailable: MirrorError: {state['error']}",
    )
    # The registry is back: the same mirror answers again.
    mirror.tracking_uri = store
    mirror.check()
    assert MirrorSource(folder, poll_seconds=1.0).champion_version() == "1"


def test_a_registry_without_credentials_says_there_is_no_model_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Plain `databricks` with no credentials anywhere: the server starts rules-only; its line said a model was kept.
    for name in [name for name in os.environ if name.startswith("DATABRICKS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg
    mirror = RegistryMirror(tmp_path, "databricks", poll_seconds=10.0)
    with caplog.at_level("WARNING", logger="winback.api"):
        mirror.check()
    [record] = [r for r in caplog.records if r.name == "winback.api"]
    assert record.getMessage() == (
        "no model: the model registry did not answer; decisions are rules-only until it does"
    )
    assert "Databricks" in record.error  # type: ignore[attr-defined]


def test_a_silent_mirror_is_an_error_and_old_versions_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = MirrorSource(tmp_path, poll_seconds=10.0)
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"version": "4", "checked_at": time.monotonic() - 100, "error": None})
    )
    with pytest.raises(MirrorError, match=r"last check was 100 s ago; it checks every 10 s"):
        source.champion_version()
    assert source.last_known_version() is None  # stale, and its folder is not there: nothing to fall back on
    (tmp_path / "version-4").mkdir()
    assert source.last_known_version() == "4"  # stale, but what the mirror last published is still on disk
    (tmp_path / "version-4").rmdir()
    # The age is read on the monotonic clock: a step of the wall clock changes nothing.
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": "4", "checked_at": time.monotonic(), "error": None}))
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 3600)
    assert source.champion_version() == "4"
    monkeypatch.undo()
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": None, "checked_at": time.monotonic(), "error": None}))
    assert source.has_news()
    assert source.champion_version() is None
    assert not source.has_news()  # read every second, acted on once per check of the mirror (or poll)
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": "5", "checked_at": time.monotonic() + 1, "error": None}))
    assert source.has_news()
    assert source.champion_version() == "5"
    every_time = MirrorSource(tmp_path, poll_seconds=0.0)  # its poll is over at once: it asks again every time
    every_time.champion_version()
    assert every_time.has_news()
    mirror = RegistryMirror(tmp_path, "unused", poll_seconds=10.0)
    for number in range(1, 6):
        version_folder(tmp_path, str(number)).mkdir()
        os.utime(version_folder(tmp_path, str(number)), (1_000_000 + number, 1_000_000 + number))
    os.utime(version_folder(tmp_path, "1"), (2_000_000, 2_000_000))  # the newest download may be an old version
    mirror._forget_old(keep="2")
    assert sorted(path.name for path in tmp_path.glob("version-*")) == ["version-1", "version-2", "version-5"]


def test_a_stopped_one_worker_server_removes_its_mirror(
    two_versions: tuple[str, Path], server_factory: object, tmp_path: Path
) -> None:
    """(Review.) With one worker uvicorn serves in the command's process and, once stopped by SIGTERM, sends the
    signal again: the process died before the mirror's folder was removed, on every stop."""
    store, _ = two_versions
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    temp = tmp_path  # the server's temp folder (``Server``)
    server = server_factory(store, 1)  # type: ignore[operator]
    assert [path.name for path in temp.glob("winback-models-*")] != []
    server.process.terminate()
    assert server.process.wait(timeout=30) == -signal.SIGTERM  # it still ends as a SIGTERM means to
    assert list(temp.glob("winback-models-*")) == [], server.output()


def test_a_version_that_cannot_be_downloaded_leaves_the_last_one_served_and_waits(
    two_versions: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = two_versions
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    mirror = RegistryMirror(tmp_path, store, poll_seconds=1.0)
    mirror.check()
    shutil.rmtree(version_folder(tmp_path, "1"))  # a temp-folder cleaner went by: it is downloaded again
    mirror.check()
    assert (version_folder(tmp_path, "1") / "bundle.json").is_file()
    registry.set_alias(registry.CHAMPION, "2", tracking_uri=store)
    downloads: list[str] = []

    def disk_full(version: str, *_args: object, **_kwargs: object) -> Path:
        downloads.append(version)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(registry_client, "download_bundle", disk_full)
        mirror.check()
        mirror.check()  # within the wait (2 s): not downloaded again, the same error said
        assert downloads == ["2"]
        with pytest.raises(MirrorError) as refused:
            MirrorSource(tmp_path, poll_seconds=1.0).champion_version()
        said = "champion version 2 could not be downloaded (OSError: [Errno 28] No space left on device)"
        assert str(refused.value) == said
        assert json.loads((tmp_path / STATE_FILE).read_text())["version"] == "1"  # still served
        assert not list(tmp_path.glob(".incoming-*"))  # nothing half-downloaded is left behind
        mirror._failed_downloads.retry_at = 0.0  # the wait is over
        mirror.check()
        assert downloads == ["2", "2"]
        assert mirror._failed_downloads.retry_at - time.monotonic() > 3.0  # the next wait is twice as long (4 s)
    mirror._failed_downloads.retry_at = 0.0
    mirror.check()  # the disk has room again
    assert MirrorSource(tmp_path, poll_seconds=1.0).champion_version() == "2"


def test_an_unreadable_mirror_state_is_an_error_not_a_dead_poller(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{")
    source = MirrorSource(tmp_path, poll_seconds=10.0)
    assert source.has_news()  # first look
    with pytest.raises(MirrorError, match=r"state .* cannot be read \(JSONDecodeError"):
        source.champion_version()
    assert not source.has_news()  # said once per poll
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": "1", "checked_at": time.monotonic(), "error": None}))
    assert source.has_news()
    assert source.champion_version() == "1"


def test_folders_of_mirrors_whose_command_is_gone_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror's folder is its command's while the command holds its lock: another container sharing the temp
    folder sees process ids of its own namespace, so a process id cannot tell (review)."""
    gone, alive, unlocked = (tmp_path / f"winback-models-{name}" for name in ("gone", "alive", "being-made"))
    for folder in (gone, alive, unlocked):
        (folder / "version-1").mkdir(parents=True)
    (gone / OWNER_LOCK).touch()  # its command was killed: nobody holds the lock
    held = try_flock(alive / OWNER_LOCK, create=True)  # a live command, here or in another namespace
    assert held is not None
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        with mirrored_registry("sqlite:///" + str(tmp_path / "none.db"), poll_seconds=5.0) as folder:
            assert not gone.exists()
            assert alive.is_dir()
            assert unlocked.is_dir()  # no lock yet: left alone
            assert try_flock(folder / OWNER_LOCK, create=False) is None  # this mirror's own lock is held
        assert not folder.exists()
    finally:
        os.close(held)


def test_a_second_sigterm_does_not_cut_the_clean_up_short() -> None:
    """(Review.) The first SIGTERM unwinds `winback serve`; a second one during the clean-up (removing the mirror's
    folder) is only noted, and the command still ends as a SIGTERM."""
    code = (
        "import os, signal, time\n"
        "from service.api.server import _cleaned_up_on_sigterm\n"
        "with _cleaned_up_on_sigterm():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(10)\n"
        "    finally:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # the second, during the clean-up\n"
        "        time.sleep(0.1)\n"
        "        print('cleaned up', flush=True)\n"
        "print('not reached: the SIGTERM ends the process', flush=True)\n"
    )
    ended = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert (ended.returncode, ended.stdout) == (-signal.SIGTERM, "cleaned up\n"), ended.stderr


def test_a_worker_that_cannot_start_again_stops_the_server_with_its_reason(
    mlflow_store: str, server_factory: object, tmp_path: Path
) -> None:
    """A worker uvicorn starts in place of a dead one builds its app again, reading the merchant config again. With
    that file broken since the start, the new worker failed, was started again, failed, ... for ever (a core spent
    on it, the server short of a worker, and nothing said but tracebacks). It now stops the whole command, which
    fails naming the reason: its supervisor restarts it, and the start's own check names the bad key."""
    server = server_factory(mlflow_store, 2)  # type: ignore[operator]
    first = _workers_of(server, 2, started=2)
    (tmp_path / "merchants.yaml").write_text("merchants: [unclosed\n", encoding="utf-8")
    first[0].kill()
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server went on without the worker:\n{server.output()}") from None
    assert code != 0
    output = server.output(last=None)
    assert "a worker of the decision API could not start, so the server stopped: ConfigError: " in output
    assert "merchants.yaml: not valid YAML" in output
    assert output.count("could not start: ConfigError") == 1, output  # the worker's log line: tried once
    assert _running([first[1]]) == []


def test_a_worker_uvicorn_gives_up_in_a_sighup_restart_does_not_fail_the_later_stop(
    mlflow_store: str, server_factory: object, tmp_path: Path
) -> None:
    """A worker that fails to replace another in a SIGHUP restart is given up by uvicorn, and the old one keeps
    serving. The reason it left for the command made the command's later stop by SIGTERM exit 2, saying a worker
    could not start and the server had stopped (review). That stop is a stop."""
    server = server_factory(mlflow_store, 2)  # type: ignore[operator]
    _workers_of(server, 2, started=2)
    config = tmp_path / "merchants.yaml"
    good = config.read_text(encoding="utf-8")
    config.write_text("merchants: [unclosed\n", encoding="utf-8")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while "aborting the restart" not in server.output(last=None) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "aborting the restart" in server.output(last=None)
    config.write_text(good, encoding="utf-8")
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # the old workers serve on
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0, server.output(last=None)
    assert "so the server stopped" not in server.output(last=None)


def _sample(text: str, name: str, labels: str = "") -> float | None:
    """The value of the series ``name{labels}`` in exposition ``text`` (None: not there); no labels: their sum."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"{name}{{{labels}}} " if labels else (f"{name}{{", f"{name} "))
    ]
    return sum(values) if values else None


def test_metrics_of_two_workers_are_the_whole_servers_on_every_scrape(
    two_versions: tuple[str, Path], server_factory: object
) -> None:
    """The workers share the port, so a scrape reaches whichever worker takes it. Each exposed its own counts: 40
    decisions read as 28, then 12, then 28 again (Prometheus takes each drop for a restart), and the model version
    as one worker saw it. Every worker now answers the figures of all of them, the version gauge included after
    a champion swap."""
    store, _ = two_versions
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    server = server_factory(store, 2)  # type: ignore[operator]
    _workers_of(server, 2, started=2)
    # Two connections open at once: the workers accept least-connections first, so each worker holds one.
    clients = [httpx.Client(base_url=server.url, headers=AUTH, timeout=10) for _ in range(2)]
    try:
        for client in clients:
            client.get("/healthz")
        deadline = time.monotonic() + 30
        while any(c.get("/readyz").json()["model_version"] != "1" for c in clients) and time.monotonic() < deadline:
            time.sleep(0.2)
        for index, client in enumerate(clients):
            for number in range(10 * (index + 1)):
                body = _body(order_id=f"ord_{index}_{number}", failure={"error_code": f"ZZ_NEVER_SEEN_{number}"})
                assert client.post("/v1/decisions", json=body).status_code == 200
        for client in clients:
            text = client.get("/metrics").text
            assert _sample(text, "winback_decisions_total") == 30, text
            assert _sample(text, "winback_new_error_codes_total") == 30, text
            assert _sample(text, "winback_model_info", 'version="1"') == 1, text
            assert _sample(text, "winback_model_info", 'version="rules-only"') in (None, 0), text

        registry.set_alias(registry.CHAMPION, "2", tracking_uri=store)
        # Every worker serves the new champion within the contract's 30 s: then any scrape says so.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            texts = [client.get("/metrics").text for client in clients]
            if all(_sample(text, "winback_model_info", 'version="1"') in (None, 0) for text in texts):
                break
            time.sleep(0.2)
        for text in texts:
            assert _sample(text, "winback_model_info", 'version="2"') == 1, text
            assert _sample(text, "winback_model_info", 'version="1"') in (None, 0), text
            assert _sample(text, "winback_decisions_total") == 30, text
    finally:
        for client in clients:
            client.close()
        registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
