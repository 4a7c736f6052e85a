"""Every process that decides reads ``WINBACK_GSM_OVERLAY`` as the decision API does: a code only the overlay
defines is classified alike by the API, the standalone executor's workers and ``resolve-charge``. The registered
pyfunc serves with the overlay its version was trained with (its ``gsm_overlay`` artifact) instead."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from model.bundle import ModelBundle
from model.catalog import ErrorCatalog, load_catalog
from model.gsm import GSM_OVERLAY_KEY, GsmError, TrainingOverlay, overlay_digest, write_overlay
from model.policy import PolicyConfig, decide
from model.registry import (
    BUNDLE_ARTIFACT,
    GSM_OVERLAY_ARTIFACT,
    RegistryError,
    WinbackPyfunc,
    default_merchant,
    register_bundle,
)
from model.training import train
from model.vocab import ErrorClass
from service.api import app as app_module
from service.api import logging as api_logging
from service.api.settings import DEMO_CONFIG
from service.executor import worker
from tests.factories import GSM_ONLY_CODE, make_history_frames, make_request
from tests.unit.test_api import settings_for


class _BuiltError(Exception):
    """Raised by the stand-in decider: the worker has built its catalog, nothing more is needed."""


def _catalog_of_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ErrorCatalog:
    seen: dict[str, Any] = {}

    def decider(catalog: ErrorCatalog, tracking_uri: str | None, seed: int | None = None) -> Any:
        seen["catalog"] = catalog
        raise _BuiltError

    monkeypatch.setattr(worker, "make_decider", decider)
    monkeypatch.setattr(api_logging, "configure_logging", lambda *_args, **_kwargs: None)
    with pytest.raises(_BuiltError):
        worker.worker_main(f"sqlite:///{tmp_path / 'winback.db'}", str(DEMO_CONFIG), None, "w0", 0.0)
    return seen["catalog"]


def test_the_executor_worker_classifies_an_overlay_code_as_the_api_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`winback executor run` read the shipped catalog whatever WINBACK_GSM_OVERLAY said, so it decided a code only
    the overlay defines (unknown to it) otherwise than the API (a processor-technical decline)."""
    overlay = write_overlay([GSM_ONLY_CODE], tmp_path / "overlay.csv")
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(overlay))
    api_catalog = app_module.build_runtime(settings_for(tmp_path, gsm_overlay=overlay)).catalog

    executor_catalog = _catalog_of_worker(monkeypatch, tmp_path)

    read = executor_catalog.normalise("stripe", "gsm_only_code")
    assert read.error_class == ErrorClass.PROCESSOR_TECHNICAL
    assert read == api_catalog.normalise("stripe", "gsm_only_code")
    assert executor_catalog.version == api_catalog.version


def test_the_executor_refuses_an_overlay_it_cannot_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A WINBACK_GSM_OVERLAY naming no file is refused as the API refuses it, not silently served without."""
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(tmp_path / "missing.csv"))
    monkeypatch.setattr(api_logging, "configure_logging", lambda *_args, **_kwargs: None)
    with pytest.raises(GsmError, match="no such overlay file"):
        worker.worker_main(f"sqlite:///{tmp_path / 'winback.db'}", str(DEMO_CONFIG), None, "w0", 0.0)


@pytest.fixture(scope="module")
def saved_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained bundle (trained with the shipped catalog), saved as a registered version's artifact."""
    attempts, nudges = make_history_frames(300, seed=5)
    bundle = train(attempts, nudges, seed=0, max_rounds=10, evaluate_unseen_codes=False).bundle
    bundle.metadata[GSM_OVERLAY_KEY] = None
    return bundle.save(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def overlay_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingOverlay]:
    """A small bundle trained with a gateway status map overlay, as `winback train` trains one, and that overlay."""
    folder = tmp_path_factory.mktemp("overlay-bundle")
    overlay = TrainingOverlay.snapshot(write_overlay([GSM_ONLY_CODE], folder / "operator.csv"), folder / "run")
    attempts, nudges = make_history_frames(300, seed=5)
    bundle = train(
        attempts, nudges, seed=0, max_rounds=10, evaluate_unseen_codes=False, catalog=overlay.catalog()
    ).bundle
    bundle.metadata[GSM_OVERLAY_KEY] = overlay.recorded()
    return bundle.save(folder / "bundle"), overlay


class _Context:
    def __init__(self, bundle_dir: Path, overlay: Path | None = None) -> None:
        self.artifacts = {BUNDLE_ARTIFACT: str(bundle_dir)}
        if overlay is not None:
            self.artifacts[GSM_OVERLAY_ARTIFACT] = str(overlay)


def test_the_pyfunc_decides_an_overlay_code_as_the_api_does_without_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, overlay_bundle: tuple[Path, TrainingOverlay]
) -> None:
    """The registered pyfunc read WINBACK_GSM_OVERLAY of the process loading it: where it was not set, a code only
    the training overlay defines was unknown to its rules and features, a processor-technical decline to the API
    serving with that overlay. It serves with the overlay its version carries."""
    bundle_dir, overlay = overlay_bundle
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WINBACK_GSM_OVERLAY", raising=False)
    runtime = app_module.build_runtime(settings_for(tmp_path, gsm_overlay=overlay.source))
    served = ModelBundle.load(bundle_dir)
    served.use_catalog(runtime.holder.catalog)  # what the API's holder does at load
    request = make_request(failure={"error_code": "gsm_only_code"})
    pyfunc = WinbackPyfunc()

    pyfunc.load_context(_Context(bundle_dir, overlay.file))
    out = pyfunc.predict(None, pd.DataFrame({"request": [request.model_dump_json()]}))
    api = decide(request, default_merchant(request), served, catalog=runtime.catalog, config=PolicyConfig(),
                 rng=np.random.default_rng(0))  # fmt: skip

    assert pyfunc._bundle is not None
    assert pyfunc._bundle.context(request)["known_code"] == 1.0
    assert api.retryable  # the overlay's class (processor technical) allows a retry
    row = out.iloc[0]
    assert (row["action"], row["strategy"], bool(row["retryable"])) == (
        str(api.action), None if api.strategy is None else str(api.strategy), api.retryable,
    )  # fmt: skip
    assert row["retry_probability"] == pytest.approx(api.retry_probability)


def test_the_pyfunc_refuses_a_version_without_the_overlay_its_model_was_trained_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, overlay_bundle: tuple[Path, TrainingOverlay]
) -> None:
    bundle_dir, _ = overlay_bundle
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistryError, match="carries no 'gsm_overlay' artifact"):
        WinbackPyfunc().load_context(_Context(bundle_dir))
    other = write_overlay([], tmp_path / "other.csv")
    with pytest.raises(RegistryError, match=f"artifact has sha256 {overlay_digest(other)}"):
        WinbackPyfunc().load_context(_Context(bundle_dir, other))


def test_a_bundle_is_registered_only_with_the_overlay_it_was_trained_with(
    tmp_path: Path, overlay_bundle: tuple[Path, TrainingOverlay], saved_bundle: Path
) -> None:
    """Checked before MLflow is touched: a version whose pyfunc could not serve with its training catalog is never
    registered (the store named here is not even created)."""
    bundle_dir, overlay = overlay_bundle
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with pytest.raises(RegistryError, match="register it with that file"):
        register_bundle(bundle_dir, "run", tracking_uri=store)
    with pytest.raises(RegistryError, match="was trained with no gateway status map overlay, not with"):
        register_bundle(saved_bundle, "run", tracking_uri=store, gsm_overlay=overlay.file)
    assert not (tmp_path / "store").exists()


def test_the_pyfunc_serves_with_its_training_catalog_and_says_the_variable_is_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bundle trained without an overlay, loaded where WINBACK_GSM_OVERLAY names one, serves with the catalog it
    was trained with, and its load says once that the variable is not read (no catalog mismatch: none served)."""
    overlay = write_overlay([GSM_ONLY_CODE], tmp_path / "overlay.csv")
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(overlay))
    pyfunc = WinbackPyfunc()

    with caplog.at_level(logging.WARNING, logger="winback.registry"):
        pyfunc.load_context(_Context(saved_bundle))

    said = [record.getMessage() for record in caplog.records if record.name == "winback.registry"]
    assert pyfunc._catalog is not None
    assert pyfunc._catalog.version == load_catalog().version
    assert len(said) == 1
    assert said[0].endswith(
        f"serves with the error catalog it was trained with (no gateway status map overlay); "
        f"WINBACK_GSM_OVERLAY={overlay} is not read"
    )


def test_the_pyfunc_says_at_load_that_its_model_was_trained_with_another_shipped_catalog(
    tmp_path: Path, saved_bundle: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the API's holder does (/readyz's catalog_mismatch): a bundle trained with another catalog than the one
    this install ships (the one its pyfunc serves with) is said once at load, naming both versions."""
    monkeypatch.delenv("WINBACK_GSM_OVERLAY", raising=False)
    older = tmp_path / "older"
    shutil.copytree(saved_bundle, older)
    meta = json.loads((older / "bundle.json").read_text())
    meta["catalog_version"] = "0123456789ab"
    (older / "bundle.json").write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING, logger="winback.registry"):
        WinbackPyfunc().load_context(_Context(older))

    said = [record.getMessage() for record in caplog.records if record.name == "winback.registry"]
    assert said == [
        f"model {meta['version']} was trained with error catalog 0123456789ab, serving with error catalog "
        f"{load_catalog().version}"
    ]


def test_the_pyfunc_reads_the_shipped_catalog_without_an_overlay(saved_bundle: Path) -> None:
    pyfunc = WinbackPyfunc()
    pyfunc.load_context(_Context(saved_bundle))
    assert pyfunc._catalog is not None
    assert pyfunc._catalog.version == load_catalog().version
