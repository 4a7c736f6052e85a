"""winback's MLflow client: tracking URIs, experiments, aliases and downloads, without the pyfunc.

The registry's reading side, apart from ``model.registry`` (the pyfunc wrapper, registration, loading bundles),
so a process that only follows ``winback@champion`` and downloads versions (the serving command's registry mirror,
service/api/mirror.py) imports MLflow alone: not LightGBM, scikit-learn, the policy or the bundle reader, about
100 MB of RSS. ``model.registry`` re-exports all of it.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from model.wording import first_line

# MLflow's usage telemetry starts a network thread when mlflow is imported; winback never phones home, so it
# is switched off before the import (an explicit MLFLOW_DISABLE_TELEMETRY=false from the caller still wins).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Named warnings MLflow raises about its own internals while being imported (its ResponsesAgent type hints,
# SQLAlchemy 2.1's deprecation of a loader strategy in its store) and about PythonModel subclasses without
# list-style type hints, or logged without an input example (the signature is explicit): nothing a caller can
# act on, so they are silenced here and only here.
_MLFLOW_NOISE: Final[tuple[tuple[str, type[Warning]], ...]] = (
    (r".*Any type hint is inferred as AnyType", UserWarning),
    (r".*Add type hints to the `predict` method", UserWarning),
    (r".*An input example was not provided when logging the model", UserWarning),
    (r"The ``noload`` loader strategy is deprecated", DeprecationWarning),
)


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    with warnings.catch_warnings():
        for message, category in _MLFLOW_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


with _quiet_mlflow():
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

MODEL_NAME: Final = "winback"
EXPERIMENT_NAME: Final = "winback"
CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"
#: Relative to the working directory; `resolve_tracking_uri` makes it absolute.
DEFAULT_TRACKING_URI: Final = "sqlite:///mlruns/mlflow.db"
#: Name of the pyfunc artifact that holds the saved bundle (``<model>/artifacts/bundle``).
BUNDLE_ARTIFACT: Final = "bundle"
_NOT_FOUND_CODES: Final = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})


class RegistryError(RuntimeError):
    """The MLflow registry answered something winback cannot use; the message says what."""


# ---------------------------------------------------------------------------------------------------------
# Tracking URI and experiment


_SECRET_QUERY_KEYS: Final = frozenset({"password", "passwd", "sslpassword"})


def shown_uri(uri: str) -> str:
    """A tracking URI fit for a message or a log line: a password in ``user:password@`` and in the query hidden
    (a database-backed store's URI carries its credentials; messages end up in cron logs)."""
    parts = urlsplit(uri)
    user, at, host = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}:***@{host}" if at and ":" in user else parts.netloc
    pairs = [pair.partition("=") for pair in parts.query.split("&")] if parts.query else []
    query = "&".join(
        f"{key}=***" if unquote(key).lower() in _SECRET_QUERY_KEYS else f"{key}{eq}{value}" for key, eq, value in pairs
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def without_uri_secrets(text: str, uri: str) -> str:
    """``text`` (an error about ``uri``: MLflow's and the drivers' name the URL they tried) with the URI's
    secrets, as ``shown_uri`` hides them, written ``***``."""
    parts = urlsplit(uri)
    user, at, _ = parts.netloc.rpartition("@")
    found = [user.partition(":")[2]] if at and ":" in user else []
    for key, _, value in (pair.partition("=") for pair in parts.query.split("&") if parts.query):
        if unquote(key).lower() in _SECRET_QUERY_KEYS:
            found.append(value)
    for secret in sorted({each for raw in found for each in (raw, unquote(raw)) if each}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def unusable_store(uri: str, error: BaseException) -> str:
    """The one line saying that the MLflow tracking store ``uri`` cannot be used: the first line of ``error``
    (MLflow's or a driver's, which name the URL they tried), the URI's secrets hidden in both."""
    return _unusable(uri, first_line(error))


def _unusable(uri: str, reason: str) -> str:
    return f"cannot use the MLflow tracking store {shown_uri(uri)}: {without_uri_secrets(reason, uri)}"


#: MLflow's Unity Catalog schemes: a model registry without a tracking store. MLflow 3.17 maps both to a tracking
#: store builder that always raises ("not supported in the current version of the MLflow client"); winback logs
#: runs and registers models in one store, so neither can serve it.
_UNITY_CATALOG_SCHEMES: Final = frozenset({"databricks-uc", "uc"})
#: Database driver modules whose package on PyPI has another name (SQLAlchemy's dialect pages, data/README.md);
#: any other driver is installed by its module's name (pymysql, pyodbc, pymssql, psycopg, psycopg2, pg8000).
_DRIVER_PACKAGES: Final = {"MySQLdb": "mysqlclient", "mysql": "mysql-connector-python"}


def refuse_a_store_that_cannot_work(uri: str) -> None:
    """RegistryError (``unusable_store``'s line) for a tracking URI this install can never use, whatever the
    network does, said before anything is contacted; a store that is merely down (a tracking server or a database
    that does not answer) passes, as the scorer serves rules-only until it is back. Refused:

    - a scheme MLflow has no tracking or registry store for (``bogus://``, ``s3://``, ``postgres://``: MLflow
      spells it ``postgresql://``); schemes come from MLflow's store registries, plugins' included;
    - a Unity Catalog URI (``databricks-uc``, ``uc:...``): a registry only, no tracking store;
    - a file store (``./mlruns``, ``file:///...``) unless ``MLFLOW_ALLOW_FILE_STORE`` is true: MLflow 3.13 and
      later refuse to open one otherwise;
    - a database URL whose SQLAlchemy driver is not installed (``mysql://`` without MySQLdb) or that MLflow cannot
      build an engine for (an unknown driver, a port that is no number)."""
    # MLflow has no public spelling of the scheme check: its client runs it when built, after which a
    # database-backed store is connected to (retried for minutes when down). tests/integration/test_registry.py
    # pins what it takes, and that MLflow's own client refuses what the checks below refuse.
    from mlflow.tracking._model_registry.utils import _get_store_registry
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    for store_registry in (_tracking_store_registry, _get_store_registry()):  # type: ignore[no-untyped-call]
        try:
            store_registry.get_store_builder(uri)
        except MlflowException as exc:
            raise RegistryError(unusable_store(uri, exc)) from None
    reason = _why_this_install_cannot_open(uri)
    if reason is not None:
        raise RegistryError(_unusable(uri, reason))


def _why_this_install_cannot_open(uri: str) -> str | None:
    """Why a store MLflow has a scheme for can never be opened by this process, or None when it may be (it may
    still be down). Nothing is contacted: environment variables and installed modules only."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.utils.uri import get_uri_scheme

    # As MLflow's store registries read it: a bare `databricks` is no file store named so.
    scheme = uri if uri in {"databricks", *_UNITY_CATALOG_SCHEMES} else get_uri_scheme(uri)  # type: ignore[no-untyped-call]
    if scheme in _UNITY_CATALOG_SCHEMES:
        return (
            f"MLflow {mlflow.__version__} takes a Unity Catalog URI as a model registry only, not as a tracking store, "
            f"and winback logs its runs where it registers its models: use databricks, an http(s):// MLflow server or "
            f"{DEFAULT_TRACKING_URI}"
        )
    if scheme in ("", "file"):
        try:
            allowed = MLFLOW_ALLOW_FILE_STORE.get()  # type: ignore[no-untyped-call]
        except ValueError:  # MLflow's reader refuses any other spelling, at every store it opens
            return (
                f"MLFLOW_ALLOW_FILE_STORE={os.environ.get('MLFLOW_ALLOW_FILE_STORE')!r} is not one of true, false, "
                "1, 0 (MLflow's spellings): set it to true to use this file store, or unset it"
            )
        if allowed:
            return None
        return (
            f"MLflow {mlflow.__version__} opens a file store only when MLFLOW_ALLOW_FILE_STORE=true: set it, "
            f"or use {DEFAULT_TRACKING_URI} (`mlflow migrate-filestore` copies a file store into SQLite)"
        )
    if scheme in DATABASE_ENGINES:
        return _why_sqlalchemy_cannot_load(uri)
    return None


def _why_sqlalchemy_cannot_load(uri: str) -> str | None:
    """Why MLflow's database store cannot build its engine for ``uri`` (None when it can): the engine is built as
    the store builds it, which loads the URL's driver and connects to nothing."""
    from mlflow.store.db.utils import create_sqlalchemy_engine

    try:
        create_sqlalchemy_engine(uri).dispose()  # type: ignore[no-untyped-call]
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0] or first_line(exc)
        backend = uri.partition(":")[0].partition("+")[0]
        return (
            f"its database driver {module} is not installed: install {_DRIVER_PACKAGES.get(module, module)} into "
            f"winback's environment, or name an installed driver in the URL ({backend}+<driver>://...)"
        )
    # Nothing is contacted yet, so whatever else fails (SQLAlchemy's NoSuchModuleError for an unknown driver, a
    # ValueError for a port that is no number, an ImportError from a driver without its C library) fails for good.
    except Exception as exc:
        return f"SQLAlchemy cannot build an engine for it ({first_line(exc)})"
    return None


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI to use: the given one, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns/mlflow.db``.

    A relative SQLite path is made absolute against the working directory and its folder is created, so
    the store (and, by `artifact_location_for`, its artifacts) lands where the caller expects.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    db_path = _sqlite_path(uri)
    if db_path is None:
        return uri
    if str(db_path) != ":memory:":
        db_path = db_path if db_path.is_absolute() else Path.cwd() / db_path
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db_path}"


def _sqlite_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if not parsed.scheme.startswith("sqlite"):
        return None
    # sqlite:///relative.db has path "/relative.db"; sqlite:////abs.db has path "//abs.db".
    return Path(unquote(parsed.path)[1:])


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where artifacts go for a store: next to a SQLite file (``<db folder>/artifacts``), else the server's.

    For a ``file:`` store MLflow already keeps artifacts inside it; for a tracking server the server decides.
    """
    db_path = _sqlite_path(tracking_uri)
    if db_path is None or str(db_path) == ":memory:":
        return None
    return (db_path.parent / "artifacts").resolve().as_uri()


@contextmanager
def tracking(tracking_uri: str | None = None) -> Iterator[str]:
    """Point MLflow's fluent API (runs, logging) at one store for the duration; yields the resolved URI."""
    uri = resolve_tracking_uri(tracking_uri)
    previous_tracking = mlflow.get_tracking_uri() if _tracking_uri_is_set() else None
    previous_registry = _registry_uri_set()
    previous_env = {name: os.environ.get(name) for name in _EXPORTED_URIS}
    _disable_telemetry()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with _quiet_mlflow():
            yield uri
    finally:
        # None is how MLflow spells "not set" (back to its default), though its annotations omit it. The registry's
        # own: restored to the tracking URI before, it stayed set for every later client of the process.
        mlflow.set_tracking_uri(previous_tracking)  # type: ignore[arg-type]
        mlflow.set_registry_uri(previous_registry)  # type: ignore[arg-type]
        # Both setters export their URI for subprocesses; neither may leak past this block (a later client, or a
        # child process, would read the registry of this block's store).
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: The environment variables MLflow's URI setters export for subprocesses.
_EXPORTED_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _registry_uri_set() -> str | None:
    """The registry URI ``mlflow.set_registry_uri`` set in this process, None when none is."""
    from mlflow.tracking._model_registry import utils as registry_utils

    return registry_utils._registry_uri


def _tracking_uri_is_set() -> bool:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils._tracking_uri is not None


@cache
def _disable_telemetry() -> None:
    from mlflow.telemetry import set_telemetry_client

    # A no-op when telemetry was already off at import; drops a client some earlier import of mlflow started.
    set_telemetry_client()  # type: ignore[no-untyped-call]


def _client(tracking_uri: str | None) -> MlflowClient:
    uri = resolve_tracking_uri(tracking_uri)
    # MLflow's client raised a driver's ModuleNotFoundError (a traceback from `winback train`) or its file store's
    # paragraph; every command that opens the registry says it in one line instead.
    refuse_a_store_that_cannot_work(uri)
    _disable_telemetry()
    with _quiet_mlflow(), _migrations_in_one_line(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


log = logging.getLogger("winback.registry")


@contextmanager
def _migrations_in_one_line(uri: str) -> Iterator[None]:
    """One line for the migrations MLflow runs meanwhile in this thread, not alembic's line per step.

    MLflow creates a new store's tables (and brings an older store's up to date) when a client first opens it, one
    alembic migration at a time, each logged at INFO as "Running upgrade A -> B, ...": 67 lines at the first start
    of `winback serve` or `winback executor run` in a new folder, which route alembic's log to stderr. The steps
    are still logged where alembic's logger is at DEBUG; a migration that fails says at which step."""
    migration = logging.getLogger("alembic.runtime.migration")
    thread = threading.get_ident()
    steps: list[Any] = []

    def one_line(record: logging.LogRecord) -> bool:
        if record.thread != thread or record.msg != "Running %s" or not record.args:
            return True
        steps.append(record.args[0] if isinstance(record.args, tuple) else record.args)
        return migration.isEnabledFor(logging.DEBUG)

    migration.addFilter(one_line)
    try:
        yield
    except BaseException:
        if steps:
            log.warning("migrating the MLflow store %s failed at step %d: %s", shown_uri(uri), len(steps), steps[-1])
        raise
    finally:
        migration.removeFilter(one_line)
    if steps:
        first, last = steps[0], steps[-1]
        start = ", ".join(getattr(first, "from_revisions", ())) or None
        end = ", ".join(getattr(last, "to_revisions", ())) or "?"
        done = (
            f"created the tables of a new MLflow store, {shown_uri(uri)}"
            if start is None
            else f"brought the tables of the MLflow store {shown_uri(uri)} up to date from revision {start}"
        )
        log.info("%s: %d migrations, to revision %s", done, len(steps), end)


def ensure_experiment(tracking_uri: str | None = None, name: str = EXPERIMENT_NAME) -> str:
    """The id of experiment ``name``, created with its artifacts next to a SQLite store when new."""
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    with _quiet_mlflow():
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return str(experiment.experiment_id)
        return str(client.create_experiment(name, artifact_location=artifact_location_for(uri)))


def set_alias(alias: str, version: str, *, tracking_uri: str | None = None) -> None:
    """Point ``winback@alias`` at ``version`` (moving it if it pointed elsewhere)."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        client.set_registered_model_alias(MODEL_NAME, alias, str(version))


def get_alias_version(alias: str, *, tracking_uri: str | None = None) -> str | None:
    """The version ``winback@alias`` points at, or None when there is no such model or alias."""
    return (registered_aliases(tracking_uri=tracking_uri) or {}).get(alias)


def registered_aliases(*, tracking_uri: str | None = None) -> dict[str, str] | None:
    """``winback``'s aliases and the versions they point at; None when no model ``winback`` is registered."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        try:
            registered = client.get_registered_model(MODEL_NAME)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND_CODES:
                return None
            raise
    return {alias: str(version) for alias, version in registered.aliases.items()}


def run_artifact_dir(version: str, *, tracking_uri: str | None = None) -> Path | None:
    """The local folder of the artifacts of the run that registered ``winback`` version ``version`` (None when
    they are not on this machine's file system: a tracking server's, an object store's)."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        run_id = client.get_model_version(MODEL_NAME, version).run_id
        if not run_id:
            return None
        parsed = urlparse(client.get_run(run_id).info.artifact_uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(unquote(parsed.path))


def run_params(version: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    """The params of the run that registered ``winback`` version ``version`` (empty when it names no run)."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        run_id = client.get_model_version(MODEL_NAME, version).run_id
        return dict(client.get_run(run_id).data.params) if run_id else {}


def register_same_model(version: str, *, tracking_uri: str | None = None) -> str:
    """Register another version of ``winback`` from the same source and run as ``version``; its number. (The same
    model under a new version number: what a hot-swap drill or benchmark moves the alias to.)"""
    # The store looks the logged model of ``source`` up through MLflow's fluent tracking URI: pointed at it here.
    with tracking(tracking_uri) as uri:
        client = _client(uri)
        existing = client.get_model_version(MODEL_NAME, str(version))
        if existing.source is None:
            raise RegistryError(f"version {version} of {MODEL_NAME} names no source to register again")
        created = client.create_model_version(MODEL_NAME, existing.source, run_id=existing.run_id)
    return str(created.version)


def download_bundle(version: str, dst: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download version ``version`` of ``winback`` into ``dst`` and return the path of its bundle folder."""
    target = Path(dst)
    target.mkdir(parents=True, exist_ok=True)
    # A version's source is a logged model (models:/m-...), which MLflow resolves against the global tracking
    # URI whatever is passed here: without `tracking` it would open ./mlflow.db in the working directory.
    with tracking(tracking_uri) as uri:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL_NAME}/{version}",
            dst_path=str(target),
            tracking_uri=uri,
            registry_uri=uri,
        )
    bundle = Path(local) / "artifacts" / BUNDLE_ARTIFACT
    if not bundle.is_dir():
        raise RegistryError(f"version {version} of {MODEL_NAME!r} has no {BUNDLE_ARTIFACT!r} artifact")
    return bundle
