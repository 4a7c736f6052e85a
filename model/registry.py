"""The MLflow model registry of winback: the pyfunc wrapper of a model bundle, registration and aliases.

This module and ``model.registry_client`` (what following an alias and downloading need, re-exported here) are the
only modules of ``model/`` that import MLflow. A trained bundle travels as one registered model
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
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from model.bundle import ModelBundle, saved_metadata
from model.catalog import ErrorCatalog, catalog_mismatch, load_catalog
from model.gsm import GSM_OVERLAY_KEY, GsmOverlaySetting, describe_overlay, overlay_digest, serving_catalog
from model.merchant_config import MerchantConfig
from model.policy import PolicyConfig, decide
from model.registry_client import (
    BUNDLE_ARTIFACT,
    CHALLENGER,
    CHAMPION,
    DEFAULT_TRACKING_URI,
    EXPERIMENT_NAME,
    MODEL_NAME,
    RegistryError,
    _quiet_mlflow,
    artifact_location_for,
    download_bundle,
    ensure_experiment,
    get_alias_version,
    resolve_tracking_uri,
    set_alias,
    tracking,
)
from model.requests import Decision, DecisionRequest

log = logging.getLogger("winback.registry")

with _quiet_mlflow():
    import mlflow
    import mlflow.models
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.pyfunc.model import PythonModel
    from mlflow.types import ColSpec, Schema

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT_NAME",
    "GSM_OVERLAY_ARTIFACT",
    "MODEL_NAME",
    "RegisteredVersion",
    "RegistryError",
    "TrainedVersion",
    "WinbackPyfunc",
    "artifact_location_for",
    "download_bundle",
    "ensure_experiment",
    "get_alias_version",
    "load_champion",
    "load_judged",
    "load_judged_champion",
    "load_trained_alias",
    "load_trained_version",
    "offline_catalog",
    "pyfunc_signature",
    "register_bundle",
    "resolve_tracking_uri",
    "set_alias",
    "set_pyfunc_model",
    "tracking",
]

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
_DEFAULT_API_KEY_SHA256: Final = "0" * 64
_ALREADY_EXISTS_CODES: Final = frozenset({"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"})
#: What a version's pyfunc is logged as: MLflow's "models from code" file that sets `WinbackPyfunc` (see it).
_PYFUNC_CODE: Final = Path(__file__).with_name("pyfunc_code.py")
#: The pyfunc artifact holding the gateway status map overlay a version was trained with (a version trained without
#: one has none): the pyfunc serves with it, whatever the loading process's ``WINBACK_GSM_OVERLAY`` says.
GSM_OVERLAY_ARTIFACT: Final = "gsm_overlay"


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version of ``winback`` and where its pyfunc lives."""

    version: str
    model_uri: str
    run_id: str


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
        """Load the bundle saved in the model's ``bundle`` artifact and serve it with the error catalog it was trained
        with: the shipped catalog, plus the gateway status map overlay of its ``gsm_overlay`` artifact when it was
        trained with one. The rules and the bundle's features both read that catalog, so the version answers alike in
        any process; ``WINBACK_GSM_OVERLAY`` of the loading process is not read (said when it names another one).
        Which overlay it serves with is said at load."""
        bundle = ModelBundle.load(Path(context.artifacts[BUNDLE_ARTIFACT]))
        recorded = bundle.metadata.get(GSM_OVERLAY_KEY)
        self._catalog = _trained_catalog(bundle, recorded, context.artifacts.get(GSM_OVERLAY_ARTIFACT))
        self._bundle = bundle
        bundle.use_catalog(self._catalog)
        said = describe_overlay(recorded)
        log.info("model %s serves with the error catalog it was trained with: %s", bundle.version, said)
        _say_unread_overlay(bundle.version, recorded)
        mismatch = catalog_mismatch(bundle, self._catalog)
        if mismatch is not None:  # the shipped catalog of this install is not the one it was trained with
            log.warning("model %s was %s", bundle.version, mismatch)

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


def _trained_catalog(bundle: ModelBundle, recorded: object, artifact: str | None) -> ErrorCatalog:
    """The catalog ``bundle`` was trained with: the shipped one and, when its metadata records an overlay
    (``recorded``), the version's overlay ``artifact``, which must be that very file. RegistryError when the
    version lacks it or carries another file."""
    if recorded is None:
        if artifact is not None:
            raise RegistryError(
                f"model {bundle.version} was trained without a gateway status map overlay, but its version carries "
                f"a {GSM_OVERLAY_ARTIFACT!r} artifact; register it again"
            )
        return load_catalog()
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        raise RegistryError(f"model {bundle.version} records an unreadable {GSM_OVERLAY_KEY!r} entry: {recorded!r}")
    if artifact is None or not Path(artifact).is_file():
        raise RegistryError(
            f"model {bundle.version} was trained with {describe_overlay(recorded)}, but its version carries no "
            f"{GSM_OVERLAY_ARTIFACT!r} artifact to serve with"
        )
    carried = overlay_digest(artifact)
    if carried != recorded["sha256"]:
        raise RegistryError(
            f"model {bundle.version} was trained with {describe_overlay(recorded)}, but its version's "
            f"{GSM_OVERLAY_ARTIFACT!r} artifact has sha256 {carried}"
        )
    return serving_catalog(artifact)


def _say_unread_overlay(version: str, recorded: object) -> None:
    """Warn when this process's ``WINBACK_GSM_OVERLAY`` names an overlay other than the one the model was trained
    with: an operator who set it for the pyfunc learns that it decides without it."""
    unread = unread_overlay(recorded)
    if unread is not None:
        log.warning(
            "model %s serves with the error catalog it was trained with (%s); WINBACK_GSM_OVERLAY=%s is not read",
            version,
            describe_overlay(recorded),
            unread,
        )


def unread_overlay(recorded: object) -> Path | None:
    """This process's ``WINBACK_GSM_OVERLAY`` when it names an overlay other than ``recorded`` (a bundle's
    ``GSM_OVERLAY_KEY`` entry: the one its model was trained with), else None."""
    configured = GsmOverlaySetting().gsm_overlay
    if configured is None:
        return None
    trained = recorded.get("sha256") if isinstance(recorded, dict) else None
    if configured.is_file() and overlay_digest(configured) == trained:
        return None
    return configured


def set_pyfunc_model() -> None:
    """Hand MLflow the pyfunc of a version it loads (``model/pyfunc_code.py``, the version's code file, calls it)."""
    mlflow.models.set_model(WinbackPyfunc())


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
    gsm_overlay: str | Path | None = None,
) -> str:
    """Log the saved bundle in ``bundle_dir`` as a pyfunc of run ``run_id``, register it, set ``alias``.

    Returns the new version of the registered model ``winback`` (as a string, e.g. ``"3"``). The run must
    exist; it may be the active run. ``input_example`` (one decision request per row) is stored with the
    model and checked by MLflow against the pyfunc's signature. ``gsm_overlay``: the overlay file the bundle was
    trained with (the one its metadata records), logged as the pyfunc's ``gsm_overlay`` artifact.
    """
    return register_bundle_details(
        bundle_dir,
        run_id,
        tracking_uri=tracking_uri,
        alias=alias,
        input_example=input_example,
        metadata=metadata,
        gsm_overlay=gsm_overlay,
    ).version


def register_bundle_details(
    bundle_dir: str | Path,
    run_id: str,
    *,
    tracking_uri: str | None = None,
    alias: str | None = CHALLENGER,
    input_example: pd.DataFrame | None = None,
    metadata: Mapping[str, Any] | None = None,
    gsm_overlay: str | Path | None = None,
) -> RegisteredVersion:
    """`register_bundle`, returning the version together with its model URI and run."""
    folder = Path(bundle_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"bundle folder {folder} does not exist")
    artifacts = {BUNDLE_ARTIFACT: str(folder)}
    overlay = _overlay_to_log(folder, gsm_overlay)
    if overlay is not None:
        artifacts[GSM_OVERLAY_ARTIFACT] = str(overlay)
    with tracking(tracking_uri) as uri:
        active = mlflow.active_run()
        resume = active is None or active.info.run_id != run_id
        if resume and active is not None:
            raise RegistryError(f"run {active.info.run_id} is active; cannot log the model to run {run_id}")
        run = mlflow.start_run(run_id=run_id) if resume else None
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=_PYFUNC_CODE,
                artifacts=artifacts,
                signature=pyfunc_signature(),
                input_example=input_example,
                pip_requirements=_pip_requirements(),
                metadata=dict(metadata) if metadata else None,
            )
        finally:
            if run is not None:
                mlflow.end_run()
        version = _new_version(uri, info.model_id)
        if alias:
            set_alias(alias, str(version), tracking_uri=uri)
    return RegisteredVersion(version=str(version), model_uri=info.model_uri, run_id=run_id)


def _overlay_to_log(bundle_dir: Path, overlay: str | Path | None) -> Path | None:
    """The overlay file to log with the bundle saved in ``bundle_dir``, checked before anything is logged: the one
    its metadata records (same SHA-256), or None when it was trained without one. RegistryError when they differ:
    that version's pyfunc could not serve with the catalog its model was trained with."""
    recorded = saved_metadata(bundle_dir).get(GSM_OVERLAY_KEY)
    trained = recorded.get("sha256") if isinstance(recorded, dict) else None
    if overlay is None:
        if trained is not None:
            raise RegistryError(
                f"the bundle in {bundle_dir} was trained with {describe_overlay(recorded)}: register it with that file"
            )
        return None
    file = Path(overlay)
    if not file.is_file():
        raise RegistryError(f"gateway status map overlay {file}: no such file")
    if trained is None or overlay_digest(file) != trained:
        raise RegistryError(
            f"the bundle in {bundle_dir} was trained with {describe_overlay(recorded)}, not with {file} "
            f"(sha256 {overlay_digest(file)})"
        )
    return file


def _new_version(uri: str, model_id: str) -> str:
    """Register the logged model ``model_id`` as a new version of ``winback``; its number.

    The calls ``log_model(registered_model_name=...)`` makes, through the client: that path printed MLflow's
    "Successfully registered model 'winback'." (or "... already exists. Creating a new version of this
    model...") and "Created version '1' of model 'winback'." on stderr, beside winback's own line saying so."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.create_registered_model(MODEL_NAME)
    except MlflowException as exc:
        if exc.error_code not in _ALREADY_EXISTS_CODES:
            raise
    return str(client.create_model_version(MODEL_NAME, source=f"models:/{model_id}", model_id=model_id).version)


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


@dataclass(frozen=True)
class TrainedVersion:
    """A registered version loaded with the error catalog it was trained with, as its pyfunc serves it: the shipped
    catalog plus the gateway status map overlay of its ``gsm_overlay`` artifact (checked against the SHA-256 its
    bundle records). The bundle's features read ``catalog`` already; an offline evaluation's rules and logged
    decisions must read it too, or the overlay's codes are unknown codes to them."""

    bundle: ModelBundle
    version: str
    catalog: ErrorCatalog
    #: The bundle's ``GSM_OVERLAY_KEY`` entry: the overlay it was trained with, None without one.
    overlay: object

    def describe(self) -> str:
        """Which catalog it is evaluated with, in one line."""
        return (
            f"model {self.version} is evaluated with the error catalog it was trained with: {self.catalog.version}, "
            f"{describe_overlay(self.overlay)}"
        )

    def unread_overlay_note(self) -> str | None:
        """One line when this process's ``WINBACK_GSM_OVERLAY`` names another overlay (it is not read), else None."""
        unread = unread_overlay(self.overlay)
        if unread is None:
            return None
        return (
            f"WINBACK_GSM_OVERLAY={unread} is not read: model {self.version} is evaluated with the overlay it was "
            "trained with"
        )


def offline_catalog(loaded: TrainedVersion | None) -> tuple[ErrorCatalog, list[str]]:
    """The error catalog an offline evaluation of ``loaded`` (None: no model, rules only) reads, and the lines saying
    so: the one the version was trained with (its own overlay wins over ``WINBACK_GSM_OVERLAY``, said when that names
    another one), else the one a rules-only API and executor serve with: the shipped catalog with the overlay
    ``WINBACK_GSM_OVERLAY`` names, if any (`model.gsm.serving_catalog`; GsmError names a file it cannot read). The
    shipped catalog alone evaluated other rules than those served: a code only the overlay defines was unknown."""
    if loaded is None:
        overlay = GsmOverlaySetting().gsm_overlay
        catalog = serving_catalog(overlay)
        if overlay is None:
            return catalog, [f"evaluated with the shipped error catalog {catalog.version} (no model registered)"]
        return catalog, [
            f"evaluated with the shipped error catalog and the gateway status map overlay {overlay} "
            f"(WINBACK_GSM_OVERLAY), as the rules are served: {catalog.version} (no model registered)"
        ]
    note = loaded.unread_overlay_note()
    return loaded.catalog, [loaded.describe(), *([f"note: {note}"] if note else [])]


def load_trained_version(version: str, *, tracking_uri: str | None = None) -> TrainedVersion:
    """Version ``version`` of ``winback`` with the error catalog it was trained with (`TrainedVersion`); RegistryError
    when the version lacks the overlay its bundle records or carries another file (naming the version: the bundle's
    own id is not what the operator re-registers)."""
    with tempfile.TemporaryDirectory(prefix="winback-bundle-") as tmp:
        folder = download_bundle(version, tmp, tracking_uri=tracking_uri)
        bundle = ModelBundle.load(folder)
        recorded = bundle.metadata.get(GSM_OVERLAY_KEY)
        artifact = _downloaded_artifact(folder.parent.parent, GSM_OVERLAY_ARTIFACT)
        try:
            catalog = _trained_catalog(bundle, recorded, artifact)
        except RegistryError as exc:
            raise RegistryError(f"version {version} of {MODEL_NAME}: {exc}") from None
    bundle.use_catalog(catalog)
    return TrainedVersion(bundle=bundle, version=version, catalog=catalog, overlay=recorded)


def load_trained_alias(alias: str, *, tracking_uri: str | None = None) -> TrainedVersion | None:
    """`load_trained_version` of the version ``winback@alias`` points at, or None when there is none."""
    version = get_alias_version(alias, tracking_uri=tracking_uri)
    if version is None:
        return None
    return load_trained_version(version, tracking_uri=tracking_uri)


def _downloaded_artifact(model_dir: Path, name: str) -> str | None:
    """The local path of pyfunc artifact ``name`` of the model downloaded into ``model_dir``, as MLflow hands it to
    ``load_context`` (``context.artifacts``), or None when the version has none."""
    config = mlflow.models.Model.load(str(model_dir)).flavors.get("python_function", {})
    entry = config.get("artifacts", {}).get(name)
    return None if entry is None else str(model_dir / entry["path"])


#: The run artifact holding a refit version's judged fit (``pipelines.train``: fitted without the run's holdout).
JUDGED_ARTIFACT: Final = "judged_bundle"


def load_judged(version: str, *, tracking_uri: str | None = None) -> ModelBundle:
    """The fit of ``version`` that its run judged: fitted without the run's time holdout. A version refit on its
    whole history keeps that fit in its run (``JUDGED_ARTIFACT``); any other version is its own judged fit.

    A promotion gate compares a challenger with this, not with the refit it serves: the refit was fitted on the
    older part of the new history's holdout, and would be judged on what it was fitted on."""
    with tracking(tracking_uri) as uri:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_id = client.get_model_version(MODEL_NAME, version).run_id
        if run_id and any(item.path == JUDGED_ARTIFACT for item in client.list_artifacts(run_id)):
            with tempfile.TemporaryDirectory(prefix="winback-judged-") as tmp:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=JUDGED_ARTIFACT, dst_path=tmp, tracking_uri=uri
                )
                return ModelBundle.load(local)
    return load_version(version, tracking_uri=tracking_uri)


def load_judged_champion(tracking_uri: str | None = None) -> tuple[ModelBundle, str] | None:
    """``load_judged`` of the version ``winback@champion`` points at, and that version; None when there is none."""
    version = get_alias_version(CHAMPION, tracking_uri=tracking_uri)
    if version is None:
        return None
    return load_judged(version, tracking_uri=tracking_uri), version


def load_champion(tracking_uri: str | None = None) -> tuple[ModelBundle, str] | None:
    """The bundle ``winback@champion`` points at and its version, or None when nothing is promoted yet."""
    return load_alias(CHAMPION, tracking_uri=tracking_uri)
