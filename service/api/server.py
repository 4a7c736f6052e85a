"""Start the decision API under uvicorn (``winback serve``)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa

from model.merchant_config import load_config
from service.api.settings import DEMO_CONFIG, default_tracking_uri

APP_FACTORY = "service.api.app:app_from_env"


def server_env(config_path: str | Path, tracking_uri: str, database_url: str | None = None) -> dict[str, str]:
    """The environment variables that carry the serve options to every worker."""
    env = {
        "WINBACK_CONFIG_PATH": str(Path(config_path).resolve()),
        "WINBACK_TRACKING_URI": tracking_uri,
        # LightGBM and numpy each spawn a thread pool per process otherwise: one request is one model call,
        # and several workers on a small box compete for the same cores.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        # MLflow would print its own plain-text lines to stderr; the workers log it as JSON (api/logging.py).
        "MLFLOW_CONFIGURE_LOGGING": "false",
    }
    if database_url:
        env["WINBACK_DATABASE_URL"] = database_url
    return env


class DatabaseUnavailableError(RuntimeError):
    """The database did not answer when the server started (its schema could not be checked)."""


class SpoolUnwritableError(RuntimeError):
    """WINBACK_SPOOL_DIR cannot be written (decisions could not be kept through a database outage)."""


class AddressUnavailableError(RuntimeError):
    """The address to listen on cannot be bound (another server holds the port, or no such local address)."""


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT, not listening yet (the server listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _OwnListener:
    """What uvicorn's supervisor hands every worker it starts (or restarts) in place of the one listening socket
    they would share: unpickled in the worker (workers are spawned), it is a socket of the worker's own, bound to
    the same address with SO_REUSEPORT. The kernel then spreads new connections over the workers' sockets by their
    addresses' hash. On one shared socket it wakes the most recently idle worker first, so a burst of keep-alive
    connections (a caller's pool, a load generator) can all land on one worker while the others idle: seen as one
    of two workers doing all the work in closed-loop runs (winback's bench, mlflow serve's, which shares uvicorn's
    supervisor)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return reuse_port_socket, (self.host, self.port)


def spreads_connections(workers: int) -> bool:
    """Whether ``workers`` processes get a listening socket each (SO_REUSEPORT balances them on Linux only)."""
    return workers > 1 and sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def _serve_workers(config: Any, host: str, port: int) -> None:
    """uvicorn's multi-process supervisor (health checks, restarts, signals) with a listening socket per worker.

    This process binds the address first, without listening: a port already taken is refused here in one line,
    port 0 becomes one port every worker shares, and the address stays this server's while workers restart. It
    binds once without SO_REUSEPORT before: a second server started on the port by mistake (the same user may join
    a SO_REUSEPORT group) is refused as "address in use" instead of silently taking half the connections."""
    from uvicorn.supervisors import Multiprocess

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        reservation = reuse_port_socket(host, port)
    except OSError as error:
        raise AddressUnavailableError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        bound = reservation.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d with a listening socket per worker (SO_REUSEPORT)", shown, bound
        )
        Multiprocess(config, sockets=[cast(socket.socket, _OwnListener(host, bound))]).run()
    finally:
        reservation.close()


def check_served_settings(database_url: str) -> None:
    """The settings of what the scorer serves besides decisions, checked before any worker starts: the executor's
    routes and pay links (``ExecutorSettings``) and the agent console (``ConsoleSettings``) read theirs on first
    use, so a bad value (a placeholder secret outside dev) would otherwise be a 500 on every such request.
    SettingsError names each variable refused, once."""
    from service.api.settings import SettingsError, settings_from_env
    from service.console.settings import ConsoleSettings
    from service.executor.settings import ExecutorSettings

    problems: list[str] = []
    for settings_class, values in ((ExecutorSettings, {"database_url": database_url}), (ConsoleSettings, {})):
        try:
            settings_from_env(settings_class, **values)
        except SettingsError as error:
            problems += [problem for problem in error.problems if problem not in problems]
    if problems:
        raise SettingsError(problems)


def run(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    config_path: str | Path | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Serve the API on ``host:port`` with ``workers`` processes; blocks until stopped.

    The merchant config is checked here first, so a bad file stops the command with ConfigError (naming the
    offending key's path) before any worker starts. The database schema is migrated once here, not by every
    worker at the same time.
    """
    import uvicorn

    from service.api.settings import load_settings
    from service.api.store import decision_spool, make_engine, shown_url
    from service.migrations import upgrade

    config_file = Path(config_path) if config_path else DEMO_CONFIG
    load_config(config_file)
    os.environ.update(server_env(config_file, tracking_uri or default_tracking_uri()))
    settings = load_settings()
    check_served_settings(settings.database_url)
    spool = decision_spool(settings.spool_dir)
    try:
        spool.check_writable()  # each worker checks again; this one says it in one line
    except OSError as error:
        raise SpoolUnwritableError(str(error)) from None
    finally:
        spool.close()  # this process owns no spool files: the workers' spools do
    database_url = settings.database_url
    engine = make_engine(database_url)
    try:
        upgrade(engine)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
        where = shown_url(database_url)
        cause = (str(error.orig or error).strip().splitlines() or [type(error.orig or error).__name__])[0]
        raise DatabaseUnavailableError(
            f"the database {where} is unavailable ({cause}): a scorer needs it once at start to bring its tables up "
            "to date; start it again when the database answers (once started, it keeps answering through outages)"
        ) from None
    finally:
        engine.dispose()
    os.environ["WINBACK_RUN_MIGRATIONS"] = "false"
    options: dict[str, Any] = {"factory": True, "host": host, "port": port, "workers": workers, "log_config": None,
                               "access_log": False, "lifespan": "on"}  # fmt: skip
    if spreads_connections(workers):
        _serve_workers(uvicorn.Config(APP_FACTORY, **options), host, port)
    else:
        uvicorn.run(APP_FACTORY, **options)
