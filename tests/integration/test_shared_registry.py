"""Many scorers, one registry: two scorer processes on one MLflow PostgreSQL backend store follow the alias."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from model import registry
from model.training import train
from tests.factories import make_history_frames
from tests.integration.test_api_server import AUTH, Server, _body

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _register_twice(store: str, artifacts: Path, bundle_dir: Path) -> list[str]:
    import mlflow
    from mlflow import MlflowClient

    # A PostgreSQL store has no folder of its own: artifacts go to a location every scorer can read.
    with registry.tracking(store):
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        experiment_id = client.create_experiment(registry.EXPERIMENT_NAME, artifact_location=artifacts.as_uri())
    assert registry.ensure_experiment(store) == experiment_id
    versions = []
    for _ in range(2):
        with registry.tracking(store), mlflow.start_run(experiment_id=experiment_id) as run:
            run_id = run.info.run_id
        versions.append(registry.register_bundle(bundle_dir, run_id, tracking_uri=store, alias=None))
    return versions


def _served_version(server: Server) -> str | None:
    try:
        response = httpx.get(f"{server.url}/readyz", timeout=2)
    except httpx.TransportError:
        return None
    version: str | None = response.json()["model_version"] if response.status_code == 200 else None
    return version


def _wait_for_version(servers: list[Server], version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_served_version(server) == version for server in servers):
            return
        time.sleep(0.2)
    served = [_served_version(server) for server in servers]
    raise AssertionError(f"scorers serve {served} after {timeout} s, expected version {version} everywhere")


def test_two_scorers_on_a_postgres_registry_follow_the_champion(postgres_url: str, tmp_path: Path) -> None:
    store = postgres_url
    attempts, nudges = make_history_frames(600, seed=1)
    result = train(attempts, nudges, seed=0, max_rounds=20, evaluate_unseen_codes=False)
    bundle_dir = result.bundle.save(tmp_path / "bundle")
    assert _register_twice(store, tmp_path / "artifacts", bundle_dir) == ["1", "2"]
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)

    servers: list[Server] = []
    try:
        for name in ("scorer-a", "scorer-b"):
            folder = tmp_path / name
            folder.mkdir()
            servers.append(Server(folder, store, workers=1))
        for server in servers:
            server.wait_healthy()
        _wait_for_version(servers, "1")
        for server in servers:
            response = httpx.post(f"{server.url}/v1/decisions", json=_body(), headers=AUTH, timeout=10)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == "1"

        registry.set_alias(registry.CHAMPION, "2", tracking_uri=store)
        _wait_for_version(servers, "2")
        for server in servers:
            response = httpx.post(f"{server.url}/v1/decisions", json=_body(), headers=AUTH, timeout=10)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == "2", server.output()
    finally:
        for server in servers:
            server.stop()
