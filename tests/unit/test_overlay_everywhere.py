"""Every process that decides reads ``WINBACK_GSM_OVERLAY`` as the decision API does: a code only the overlay
defines is classified alike by the API, the standalone executor's workers and ``resolve-charge``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model.catalog import ErrorCatalog
from model.gsm import GsmError, write_overlay
from model.vocab import ErrorClass
from service.api import app as app_module
from service.api import logging as api_logging
from service.api.settings import DEMO_CONFIG
from service.executor import worker
from tests.factories import GSM_ONLY_CODE
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
