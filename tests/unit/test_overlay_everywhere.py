"""Every process that decides reads ``WINBACK_GSM_OVERLAY`` as the decision API does: a code only the overlay
defines is classified alike by the API, the standalone executor's workers and ``resolve-charge``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from model.bundle import ModelBundle
from model.catalog import ErrorCatalog, load_catalog
from model.gsm import GsmError, with_overlay, write_overlay
from model.policy import PolicyConfig, decide
from model.registry import BUNDLE_ARTIFACT, WinbackPyfunc, default_merchant
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
    return bundle.save(tmp_path_factory.mktemp("bundle"))


class _Context:
    def __init__(self, bundle_dir: Path) -> None:
        self.artifacts = {BUNDLE_ARTIFACT: str(bundle_dir)}


def test_the_pyfunc_decides_an_overlay_code_as_the_api_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_bundle: Path
) -> None:
    """`mlflow models serve` and batch scoring (the registered pyfunc) read the shipped catalog whatever
    WINBACK_GSM_OVERLAY said: a code only the overlay defines was unknown to their rules and features, a
    processor-technical decline to the API's."""
    overlay = write_overlay([GSM_ONLY_CODE], tmp_path / "overlay.csv")
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(overlay))
    runtime = app_module.build_runtime(settings_for(tmp_path, gsm_overlay=overlay))
    served = ModelBundle.load(saved_bundle)
    served.use_catalog(runtime.holder.catalog)  # what the API's holder does at load
    request = make_request(failure={"error_code": "gsm_only_code"})
    pyfunc = WinbackPyfunc()

    pyfunc.load_context(_Context(saved_bundle))
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


def test_the_pyfunc_says_at_load_that_its_model_was_trained_with_another_catalog(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the API's holder does (/readyz's catalog_mismatch): a bundle trained with the shipped catalog, loaded
    where an overlay is served, is said once at load, naming both versions."""
    overlay = write_overlay([GSM_ONLY_CODE], tmp_path / "overlay.csv")
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(overlay))
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE]).version

    with caplog.at_level(logging.WARNING, logger="winback.registry"):
        WinbackPyfunc().load_context(_Context(saved_bundle))

    said = [record.getMessage() for record in caplog.records if record.name == "winback.registry"]
    assert len(said) == 1
    assert f"trained with error catalog {load_catalog().version}, serving with error catalog {overlaid}" in said[0]


def test_the_pyfunc_reads_the_shipped_catalog_without_an_overlay(saved_bundle: Path) -> None:
    pyfunc = WinbackPyfunc()
    pyfunc.load_context(_Context(saved_bundle))
    assert pyfunc._catalog is not None
    assert pyfunc._catalog.version == load_catalog().version
