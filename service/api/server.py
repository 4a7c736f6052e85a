"""Start the decision API under uvicorn (``winback serve``)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from model.merchant_config import load_config
from service.api.settings import DEMO_CONFIG, Settings, default_tracking_uri
from service.api.startup import StartupWatch
from service.signals import restore_sigchld_default

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


class SpoolUnwritableError(RuntimeError):
    """WINBACK_SPOOL_DIR cannot be written (decisions could not be kept through a database outage)."""


class PortInUseError(RuntimeError):
    """``--port`` is taken on ``--host``: another server listens there."""


def port_in_use(host: str, port: int) -> bool:
    """Whether another socket listens on ``host:port``, bound as uvicorn binds it (an IPv6 address by its family;
    SO_REUSEADDR, so a port left in TIME_WAIT is free). Any other bind error is uvicorn's to report: a name this
    check would resolve otherwise than uvicorn's own server is not refused here."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def load_served_settings() -> Settings:
    """The API's ``Settings``, after checking the settings of everything else the scorer serves: the executor's
    routes and pay links (``ExecutorSettings``) and the agent console (``ConsoleSettings``) read theirs on first
    use, so a bad value (a placeholder secret outside dev) would otherwise be a 500 on every such request.
    SettingsError names every variable refused by any of the three, each once."""
    from service.api.settings import SettingsError, load_settings, settings_from_env
    from service.console.settings import ConsoleSettings
    from service.executor.settings import ExecutorSettings

    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = load_settings()
    except SettingsError as error:
        problems += error.problems
    for served in (ExecutorSettings, ConsoleSettings):
        try:
            settings_from_env(served)
        except SettingsError as error:
            problems += [problem for problem in error.problems if problem not in problems]
    if settings is None or problems:
        raise SettingsError(problems)
    return settings


def refuse_placeholder_secrets_beyond_loopback(host: str) -> None:
    """SettingsError when the server would listen beyond this machine (``host`` not a loopback address) with a
    placeholder secret. WINBACK_ENV defaults to dev, which takes the public placeholders: served so on 0.0.0.0, anyone
    could forge payment links, the providers' STOP and receipt callbacks (their key derives from the link secret)
    and console sessions."""
    from service.api.settings import SettingsError, settings_from_env
    from service.console.settings import PLACEHOLDER_CONSOLE_SECRET, ConsoleSettings
    from service.executor.settings import PLACEHOLDER_LINK_SECRET, ExecutorSettings

    if _is_loopback(host):
        return
    placeholders = (
        ("WINBACK_LINK_SECRET", settings_from_env(ExecutorSettings).link_secret, PLACEHOLDER_LINK_SECRET,
         "payment links and the providers' callbacks"),
        ("WINBACK_CONSOLE_SECRET", settings_from_env(ConsoleSettings).console_secret, PLACEHOLDER_CONSOLE_SECRET,
         "console sessions"),
    )  # fmt: skip
    problems = [
        f"{name} is the public placeholder, which signs {what} anyone could forge; --host {host} listens beyond "
        "this machine: set it to a random string of at least 32 characters (and WINBACK_ENV=prod), or serve on "
        "127.0.0.1"
        for name, secret, placeholder, what in placeholders
        if secret.get_secret_value() == placeholder
    ]
    if problems:
        raise SettingsError(problems)


def _is_loopback(host: str) -> bool:
    if host.casefold() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


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
    from model.registry_client import refuse_a_store_that_cannot_work
    from service.api.store import decision_spool, make_engine
    from service.migrations import upgrade_at_start

    # Under an ignored SIGCHLD uvicorn's supervisor reads every ended worker as alive: it replaces one only once its
    # health check times out, after a SIGKILL to its pid (someone else's by then, maybe), and replaces one that
    # could not start for ever rather than stop. Here too for callers other than the CLI (the benches, the tests).
    restore_sigchld_default()
    config_file = Path(config_path) if config_path else DEMO_CONFIG
    load_config(config_file)
    os.environ.update(server_env(config_file, tracking_uri or default_tracking_uri()))
    settings = load_served_settings()
    refuse_placeholder_secrets_beyond_loopback(host)
    if settings.load_model:
        # A URI this install can never use (`bogus://x`, `mysql://` without its driver, a file store MLflow will not
        # open) served rules-only for ever, said only by /readyz. A store that is down is not refused: the scorer
        # answers with the rules-only policy until it is back.
        refuse_a_store_that_cannot_work(settings.tracking_uri)
    # uvicorn finds a taken port only once a worker has loaded the model, and says it in a JSON log line (exit 3);
    # asked here, before the spool and the database are touched, it is the command's one-line reason.
    if port_in_use(host, port):
        raise PortInUseError(f"port {port} on {host} is in use: stop what runs there or pass another --port")
    spool = decision_spool(settings.spool_dir)
    try:
        spool.check_writable()  # each worker checks again; this one says it in one line
    except OSError as error:
        raise SpoolUnwritableError(str(error)) from None
    finally:
        spool.close()  # this process owns no spool files: the workers' spools do
    upgrade_at_start(settings.database_url, make_engine, "a scorer")
    os.environ["WINBACK_RUN_MIGRATIONS"] = "false"
    with _cleaned_up_on_sigterm():
        _serve(host, port, workers, settings)


def _serve(host: str, port: int, workers: int, settings: Settings) -> None:
    import uvicorn

    from service.api.accept import BALANCED_LOOP, connection_board
    from service.api.logging import configure_logging
    from service.api.metrics import MULTIPROC_DIR_ENV
    from service.api.mirror import mirrored_registry

    with contextlib.ExitStack() as stack:
        if settings.load_model:
            configure_logging(settings.log_level)  # the mirror's lines, as the workers' (JSON on stderr)
            # One registry client for all the workers, in this process (api/mirror.py).
            folder = stack.enter_context(mirrored_registry(settings.tracking_uri, settings.model_poll_seconds))
            stack.enter_context(_environment({"WINBACK_MODEL_MIRROR_DIR": str(folder)}))
        if workers > 1:
            # The workers share the port, so a scrape reaches any one of them: each answers the figures of all, from
            # files in a folder of this run's own (a folder of an earlier run would add its counts; api/metrics.py).
            metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="winback-metrics-"))
            stack.enter_context(_environment({MULTIPROC_DIR_ENV: metrics_dir}))
        board_env = stack.enter_context(connection_board(workers))  # connections spread evenly (api/accept.py)
        stack.enter_context(_environment(board_env))
        # uvicorn starts (and restarts) every worker from this thread, the main one, which lives as long as the
        # process: the kernel's signal at its end (service/linux.py) comes when the command ends.
        watch = stack.enter_context(StartupWatch(workers))
        stack.enter_context(_environment(watch.environment))
        try:
            uvicorn.run(
                APP_FACTORY,
                factory=True,
                host=host,
                port=port,
                workers=workers,
                loop=BALANCED_LOOP,
                log_config=None,
                access_log=False,
                lifespan="on",
            )
        except SystemExit:  # one worker: uvicorn ends this process itself when its start fails
            watch.raise_if_a_start_failed()
            raise
        watch.raise_if_a_start_failed()  # several: uvicorn returns when it stopped for a worker that could not start


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set ``values`` in the environment (the workers read them; None: unset) for the block; then put back what was
    there."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Terminated(BaseException):
    """SIGTERM, raised where the serving command is, so that what it holds is cleaned up on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _RaiseOnce:
    """A SIGTERM handler that raises ``_Terminated`` the first time and only notes the signal after: a second
    SIGTERM during the clean-up must not cut it short (it left the mirror's folder behind: review)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            raise _Terminated(signum)


@contextlib.contextmanager
def _cleaned_up_on_sigterm() -> Iterator[None]:
    """Run the block with SIGTERM raising ``_Terminated``, then end by that SIGTERM after the block's clean-up.

    With one worker, uvicorn serves in this process and, once it has shut down on a SIGTERM, sends the signal
    again to the handler it found (to end as the signal means): under the default one the process died there,
    before the registry mirror's folder was removed, on every stop by docker, systemd or Kubernetes (review).
    """
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        yield
        return
    handler = _RaiseOnce()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        pass  # noted by the handler; the block's clean-up has run
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if handler.signum is not None:
        signal.raise_signal(handler.signum)  # now that everything is cleaned up, end as a SIGTERM means to
