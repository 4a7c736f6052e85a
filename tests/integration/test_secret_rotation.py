"""Rotating the link secret or the providers' callback secret without voiding what is already out there.

Before: ``LinkSigner`` verified with the one current secret and callbacks were checked against the one current key.
Rotating ``WINBACK_LINK_SECRET`` (say after a leak of an old backup) turned every link customers held into "This
link is not valid" and, while the callback key derives from the link secret (the default), changed every callback
URL configured at the BSPs: their STOP replies were refused with 403 until each provider was given the new URLs,
and the opt-outs they carried were lost. Now the secret before a rotation (``WINBACK_LINK_SECRET_PREVIOUS``,
``WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS``) is still accepted; left unset, only the current one is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.executor.links import LinkError
from service.executor.routes import _pay
from service.executor.settings import ExecutorSettings
from service.executor.worker import build_executor
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    FakeConnector,
    Harness,
    event,
    make_harness,
    runtime,
    token_of,
)
from tests.integration.test_provider_callbacks import stop_reply, urls
from tests.unit.test_api import Api, start

OLD = "old-link-secret-" + "o" * 32
NEW = "new-link-secret-" + "n" * 32


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    harness = start(tmp_path)
    yield harness
    harness.close()


def rotate_links(h: Harness) -> None:
    """Restart the executor's link signing with the settings the environment gives now."""
    settings = ExecutorSettings(database_url="sqlite://")
    h.executor.links = build_executor(settings, h.executor.config, h.executor.decider, engine=h.executor.engine).links


def test_a_link_sent_before_a_rotation_of_the_link_secret_is_still_paid_with_the_previous_secret_set(
    make_harness: Any,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WINBACK_LINK_SECRET", OLD)
    h = make_harness({"action": "retarget", "channel": "sms"}, connector=FakeConnector(results=["success"]))
    h.executor.payment_failed("m_demo", event())
    h.drain()  # the SMS with a link signed with OLD goes out
    token = token_of(h)

    monkeypatch.setenv("WINBACK_LINK_SECRET", NEW)  # rotated, and the old secret no longer accepted
    rotate_links(h)
    with pytest.raises(LinkError) as refused:
        _pay(runtime(h), token)
    assert refused.value.status_code == 400

    monkeypatch.setenv("WINBACK_LINK_SECRET_PREVIOUS", OLD)  # rotated, the old one accepted while its links live
    rotate_links(h)
    code, _title, message = _pay(runtime(h), token)
    assert code == 200, message
    assert h.view().state == "SUCCEEDED"


def test_callback_urls_made_before_a_rotation_are_accepted_while_the_previous_secret_is_set(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINBACK_LINK_SECRET", OLD)
    derived_from_old = urls()["inbound"]  # the URL configured at the provider, its key derived from OLD
    monkeypatch.setenv("WINBACK_LINK_SECRET", NEW)
    monkeypatch.setenv("WINBACK_LINK_SECRET_PREVIOUS", OLD)
    assert urls()["inbound"] != derived_from_old
    assert stop_reply(api, url=derived_from_old).json() == {"message": True, "opted_out": True}
    assert stop_reply(api, url=urls()["inbound"]).status_code == 200


def test_a_rotated_callback_secret_accepts_the_previous_ones_urls_only_while_it_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINBACK_PROVIDER_CALLBACK_SECRET", OLD)
    configured = urls()["inbound"]
    monkeypatch.setenv("WINBACK_PROVIDER_CALLBACK_SECRET", NEW)
    monkeypatch.setenv("WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS", OLD)
    assert answers(tmp_path / "during", configured, urls()["inbound"]) == [200, 200]
    monkeypatch.delenv("WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS")
    assert answers(tmp_path / "after", configured, urls()["inbound"]) == [403, 200]


def answers(folder: Path, *inbound_urls: str) -> list[int]:
    """The status codes a freshly started app (with the environment's secrets) answers STOPs to ``inbound_urls``."""
    folder.mkdir()
    app = start(folder)
    try:
        return [stop_reply(app, url=url).status_code for url in inbound_urls]
    finally:
        app.close()


def test_a_short_previous_secret_is_refused_outside_dev_naming_it() -> None:
    with pytest.raises(ValueError, match="WINBACK_LINK_SECRET_PREVIOUS must be at least 32 characters"):
        ExecutorSettings(env="prod", link_secret=NEW, link_secret_previous="short")
    with pytest.raises(ValueError, match="WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS must be at least 32"):
        ExecutorSettings(env="prod", link_secret=NEW, provider_callback_secret_previous="short")
