"""The MLflow model registry of winback: the pyfunc wrapper of a model bundle, registration and aliases.

This is the only module of ``model/`` that imports MLflow. A trained bundle travels as one registered model
version of ``winback`` (a pyfunc whose ``artifacts/bundle`` folder is the saved `ModelBundle`); serving follows
the ``champion`` alias and a fresh training run gets ``challenger``. Aliases only: MLflow's stages are
deprecated.

Pyfunc input (one decision request per row), a DataFrame with the columns

- ``request`` (string, required): the JSON body of a decision request (CONTRACT.md section 2);
- ``merchant`` (string, optional): the JSON of that merchant's config section (CONTRACT.md section 4, without
  the ``merchants:`` wrapper). When missing or null, a permissive default applies: the request's
  ``available_connectors`` (else its failing connector) as pecking order and the default retry and retarget
  settings.

Pyfunc output, one row per request: ``decision`` (the JSON of the whole decision, section 2 response) and the
flattened key fields ``action``, ``strategy``, ``connector``, ``channel``, ``execute_at`` (ISO 8601 UTC),
``retryable``, ``retry_probability``, ``expected_success``, ``propensity`` and ``model_version``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from model.bundle import ModelBundle
from model.catalog import ErrorCatalog, load_catalog
from model.merchant_config import MerchantConfig
from model.policy import PolicyConfig, decide
from model.requests import Decision, DecisionRequest

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
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.pyfunc.model import PythonModel
    from mlflow.types import ColSpec, Schema

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT_NAME",
    "MODEL_NAME",
    "RegisteredVersion",
    "WinbackPyfunc",
    "artifact_location_for",
    "download_bundle",
    "ensure_experiment",
    "get_alias_version",
    "load_champion",
    "pyfunc_signature",
    "register_bundle",
    "resolve_tracking_uri",
    "set_alias",
    "tracking",
]

MODEL_NAME: Final = "winback"
EXPERIMENT_NAME: Final = "winback"
CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"
#: Relative to the working directory; `resolve_tracking_uri` makes it absolute.
DEFAULT_TRACKING_URI: Final = "sqlite:///mlruns/mlflow.db"
#: Name of the pyfunc artifact that holds the saved bundle (``<model>/artifacts/bundle``).
BUNDLE_ARTIFACT: Final = "bundle"

_OUTPUT_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("decision", "string"),
    ("action", "string"),
    ("strategy", "string"),
    ("connector", "string"),
    ("channel", "string"),
    ("execute_at", "string"),
    ("retryable", "boolean"),
    ("retry_probability", "double"),
    ("expected_success", "double"),
    ("propensity", "double"),
    ("model_version", "string"),
)
_NOT_FOUND_CODES: Final = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_DEFAULT_API_KEY_SHA256: Final = "0" * 64


class RegistryError(RuntimeError):
    """The MLflow registry answered something winback cannot use; the message says what."""


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version of ``winback`` and where its pyfunc lives."""

    version: str
    model_uri: str
    run_id: str


# ---------------------------------------------------------------------------------------------------------
# Tracking URI and experiment


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
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    _disable_telemetry()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with _quiet_mlflow():
            yield uri
    finally:
        # None is how MLflow spells "not set" (back to its default), though its annotations omit it.
        mlflow.set_tracking_uri(previous_tracking)  # type: ignore[arg-type]
        mlflow.set_registry_uri(previous_tracking)  # type: ignore[arg-type]
        # set_tracking_uri exports the URI for subprocesses; do not leak it past this block.
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


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
    _disable_telemetry()
    with _quiet_mlflow():
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


# ---------------------------------------------------------------------------------------------------------
# The pyfunc


def pyfunc_signature() -> ModelSignature:
    """The signature of the registered pyfunc (see the module docstring for the columns)."""
    inputs = Schema([ColSpec("string", "request"), ColSpec("string", "merchant", required=False)])
    outputs = Schema([ColSpec(dtype, name) for name, dtype in _OUTPUT_COLUMNS])  # type: ignore[arg-type]
    return ModelSignature(inputs=inputs, outputs=outputs)


def default_merchant(request: DecisionRequest) -> MerchantConfig:
    """The permissive merchant config the pyfunc uses when a row carries none."""
    connectors = request.available_connectors or [request.failure.connector]
    return MerchantConfig(api_key_sha256=_DEFAULT_API_KEY_SHA256, connectors=list(connectors))


def _parse_json(value: Any, column: str, row: int) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f"row {row}: column {column!r} must hold a JSON object string, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"row {row}: column {column!r} is not valid JSON: {exc}") from None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def decisions_frame(decisions: list[Decision]) -> pd.DataFrame:
    """The pyfunc output frame of decisions, in order."""
    rows = []
    for decision in decisions:
        rows.append(
            {
                "decision": decision.model_dump_json(),
                "action": str(decision.action),
                "strategy": None if decision.strategy is None else str(decision.strategy),
                "connector": decision.connector,
                "channel": None if decision.channel is None else str(decision.channel),
                "execute_at": decision.execute_at.isoformat(),
                "retryable": bool(decision.retryable),
                "retry_probability": float(decision.retry_probability),
                "expected_success": float(decision.expected_success),
                "propensity": float(decision.propensity),
                "model_version": decision.model_version,
            }
        )
    return pd.DataFrame(rows, columns=[name for name, _ in _OUTPUT_COLUMNS])


class WinbackPyfunc(PythonModel):  # type: ignore[misc]
    """A registered winback model as an MLflow pyfunc: decision requests in, decisions out.

    Made for interoperability (``mlflow.pyfunc.load_model("models:/winback@champion")``); winback's own
    scorer serves the bundle directly. Decisions use the same `decide()` as the API, with a fixed seed per
    call so the same frame gives the same answer.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._bundle: ModelBundle | None = None
        self._catalog: ErrorCatalog | None = None

    def load_context(self, context: Any) -> None:
        """Load the bundle saved in the model's ``bundle`` artifact, and the error catalog."""
        self._bundle = ModelBundle.load(Path(context.artifacts[BUNDLE_ARTIFACT]))
        self._catalog = load_catalog()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Decide every request of ``model_input`` (see the module docstring for both frames)."""
        if self._bundle is None or self._catalog is None:
            self.load_context(context)
        bundle, catalog = self._bundle, self._catalog
        if bundle is None or catalog is None:  # pragma: no cover - load_context always sets both
            raise RuntimeError("the winback pyfunc has no bundle loaded")
        if "request" not in model_input.columns:
            raise ValueError("model input needs a 'request' column of decision request JSON strings")
        rng = np.random.default_rng(self.seed)
        merchants = model_input["merchant"] if "merchant" in model_input.columns else None
        decisions = []
        for row, raw in enumerate(model_input["request"].tolist(), start=1):
            request = DecisionRequest.model_validate(_parse_json(raw, "request", row))
            raw_merchant = None if merchants is None else merchants.iloc[row - 1]
            merchant = (
                default_merchant(request)
                if _is_missing(raw_merchant)
                else MerchantConfig.model_validate(_parse_json(raw_merchant, "merchant", row))
            )
            decisions.append(decide(request, merchant, bundle, catalog=catalog, config=PolicyConfig(), rng=rng))
        return decisions_frame(decisions)


# ---------------------------------------------------------------------------------------------------------
# Registration and aliases


def _pip_requirements() -> list[str]:
    # Pinned from this environment: inferring them would load the model in a subprocess (slow, and online).
    from importlib.metadata import PackageNotFoundError, version

    names = ("mlflow", "numpy", "pandas", "pyarrow", "scikit-learn", "lightgbm", "scipy", "pydantic", "pyyaml")
    requirements = []
    for name in names:
        try:
            requirements.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            requirements.append(name)
    return requirements


def register_bundle(
    bundle_dir: str | Path,
    run_id: str,
    *,
    tracking_uri: str | None = None,
    alias: str | None = CHALLENGER,
    input_example: pd.DataFrame | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Log the saved bundle in ``bundle_dir`` as a pyfunc of run ``run_id``, register it, set ``alias``.

    Returns the new version of the registered model ``winback`` (as a string, e.g. ``"3"``). The run must
    exist; it may be the active run. ``input_example`` (one decision request per row) is stored with the
    model and, by MLflow, replayed through the pyfunc once as a check.
    """
    return register_bundle_details(
        bundle_dir,
        run_id,
        tracking_uri=tracking_uri,
        alias=alias,
        input_example=input_example,
        metadata=metadata,
    ).version


def register_bundle_details(
    bundle_dir: str | Path,
    run_id: str,
    *,
    tracking_uri: str | None = None,
    alias: str | None = CHALLENGER,
    input_example: pd.DataFrame | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> RegisteredVersion:
    """`register_bundle`, returning the version together with its model URI and run."""
    folder = Path(bundle_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"bundle folder {folder} does not exist")
    with tracking(tracking_uri) as uri:
        active = mlflow.active_run()
        resume = active is None or active.info.run_id != run_id
        if resume and active is not None:
            raise RegistryError(f"run {active.info.run_id} is active; cannot log the model to run {run_id}")
        run = mlflow.start_run(run_id=run_id) if resume else None
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=WinbackPyfunc(),
                artifacts={BUNDLE_ARTIFACT: str(folder)},
                signature=pyfunc_signature(),
                input_example=input_example,
                pip_requirements=_pip_requirements(),
                metadata=dict(metadata) if metadata else None,
                registered_model_name=MODEL_NAME,
            )
        finally:
            if run is not None:
                mlflow.end_run()
        version = info.registered_model_version
        if version is None:
            raise RegistryError(f"MLflow did not register {info.model_uri} as {MODEL_NAME!r}")
        if alias:
            set_alias(alias, str(version), tracking_uri=uri)
    return RegisteredVersion(version=str(version), model_uri=info.model_uri, run_id=run_id)


def set_alias(alias: str, version: str, *, tracking_uri: str | None = None) -> None:
    """Point ``winback@alias`` at ``version`` (moving it if it pointed elsewhere)."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        client.set_registered_model_alias(MODEL_NAME, alias, str(version))


def get_alias_version(alias: str, *, tracking_uri: str | None = None) -> str | None:
    """The version ``winback@alias`` points at, or None when there is no such model or alias."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        try:
            registered = client.get_registered_model(MODEL_NAME)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND_CODES:
                return None
            raise
    version = registered.aliases.get(alias)
    return None if version is None else str(version)


def model_version_info(version: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run id, source and aliases of one version of ``winback`` (for reports)."""
    client = _client(tracking_uri)
    with _quiet_mlflow():
        mv = client.get_model_version(MODEL_NAME, str(version))
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "aliases": list(mv.aliases)}


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


def load_version(version: str, *, tracking_uri: str | None = None) -> ModelBundle:
    """Download and load the bundle of one version of ``winback``."""
    with tempfile.TemporaryDirectory(prefix="winback-bundle-") as tmp:
        return ModelBundle.load(download_bundle(version, tmp, tracking_uri=tracking_uri))


def load_alias(alias: str, *, tracking_uri: str | None = None) -> tuple[ModelBundle, str] | None:
    """The bundle ``winback@alias`` points at and its version, or None when there is none."""
    version = get_alias_version(alias, tracking_uri=tracking_uri)
    if version is None:
        return None
    return load_version(version, tracking_uri=tracking_uri), version


def load_champion(tracking_uri: str | None = None) -> tuple[ModelBundle, str] | None:
    """The bundle ``winback@champion`` points at and its version, or None when nothing is promoted yet."""
    return load_alias(CHAMPION, tracking_uri=tracking_uri)
