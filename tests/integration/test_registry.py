"""The MLflow registry of winback against a real SQLite store in a temp dir: register, aliases, pyfunc."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from model import registry, registry_client
from model.bundle import ModelBundle
from model.training import train
from tests.factories import make_history_frames, make_request


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    attempts, nudges = make_history_frames(600, seed=3)
    result = train(attempts, nudges, seed=0, max_rounds=20, evaluate_unseen_codes=False)
    return result.bundle.save(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture
def store(mlflow_store: str) -> str:
    return mlflow_store


def _new_run(store: str) -> str:
    import mlflow

    experiment_id = registry.ensure_experiment(store)
    with registry.tracking(store), mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("x", 1.0)
    return str(run.info.run_id)


def test_empty_store_has_no_champion_and_no_alias(store: str) -> None:
    assert registry.load_champion(store) is None
    assert registry.get_alias_version(registry.CHALLENGER, tracking_uri=store) is None


def test_following_a_registry_with_no_champion_leaves_the_pyfunc_side_unimported(store: str) -> None:
    """An executor worker asks for the champion as it starts (service.api.model_holder.MlflowSource): through
    ``model.registry`` it imported LightGBM and scikit-learn with it (seconds of CPU at every start, each
    worker) although an empty registry has nothing to load. MLflow alone answers the alias."""
    code = (
        "import sys; from service.api.model_holder import MlflowSource; "
        f"print(MlflowSource({store!r}).champion_version(), "
        "sorted(name for name in ('model.registry', 'lightgbm', 'sklearn') if name in sys.modules))"
    )
    asked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split(maxsplit=1) == ["None", "[]\n"]


def test_register_sets_challenger_and_keeps_artifacts_next_to_the_store(
    store: str, bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_id = _new_run(store)
    first = registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    second = registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    assert (first, second) == ("1", "2")
    assert registry.get_alias_version(registry.CHALLENGER, tracking_uri=store) == "2"
    assert registry.get_alias_version(registry.CHAMPION, tracking_uri=store) is None
    # Artifacts sit in <store folder>/artifacts, and nothing was written to MLflow's defaults (./mlruns, ./mlflow.db).
    assert list((tmp_path / "artifacts").rglob("MLmodel"))
    assert not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "mlflow.db"]


def test_champion_alias_moves_and_loads_that_version(store: str, bundle_dir: Path) -> None:
    run_id = _new_run(store)
    registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    loaded = registry.load_champion(store)
    assert loaded is not None
    bundle, version = loaded
    assert version == "1"
    assert isinstance(bundle, ModelBundle)
    assert bundle.version == ModelBundle.load(bundle_dir).version
    registry.set_alias(registry.CHAMPION, "2", tracking_uri=store)
    assert registry.get_alias_version(registry.CHAMPION, tracking_uri=store) == "2"


def test_default_tracking_uri_is_a_sqlite_file_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = registry.resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert registry.artifact_location_for(uri) == (tmp_path / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere/x.db")
    assert registry.resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/elsewhere/x.db"
    assert registry.resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_pyfunc_from_the_registry_decides_json_requests(store: str, bundle_dir: Path) -> None:
    import mlflow.pyfunc

    run_id = _new_run(store)
    example = pd.DataFrame({"request": [make_request().model_dump_json()]})
    version = registry.register_bundle(bundle_dir, run_id, tracking_uri=store, input_example=example)
    registry.set_alias(registry.CHAMPION, version, tracking_uri=store)
    with registry.tracking(store):
        model = mlflow.pyfunc.load_model(f"models:/{registry.MODEL_NAME}@{registry.CHAMPION}")
    assert model.metadata.get_input_schema().input_names() == ["request", "merchant"]
    visa_category_1 = make_request(failure={"network_decline_code": "14", "error_code": "invalid_number"})
    frame = pd.DataFrame({"request": [make_request().model_dump_json(), visa_category_1.model_dump_json()]})
    out = model.predict(frame)
    assert list(out.columns) == [name for name, _ in registry._OUTPUT_COLUMNS]
    assert len(out) == 2
    assert set(out["action"]) <= {"retry", "retarget", "stop"}
    assert out["action"].iloc[1] != "retry"  # a Visa category-1 code never gets a silent retry
    decision = json.loads(out["decision"].iloc[0])
    assert decision["action"] == out["action"].iloc[0]
    assert 0.0 <= out["expected_success"].iloc[0] <= 1.0


def test_pyfunc_names_a_bad_row(store: str, bundle_dir: Path) -> None:
    model = registry.WinbackPyfunc()
    model._bundle = ModelBundle.load(bundle_dir)
    from model.catalog import load_catalog

    model._catalog = load_catalog()
    with pytest.raises(ValueError, match=r"row 2: column 'request' is not valid JSON"):
        model.predict(None, pd.DataFrame({"request": [make_request().model_dump_json(), "{oops"]}))


def test_the_same_model_registers_again_under_a_new_version_in_a_copy_of_the_store(
    store: str, bundle_dir: Path, tmp_path: Path
) -> None:
    """What the swap benchmark does (service/api/swap_bench.py): copy the store, then register the champion's model
    again there, so moving the alias swaps models without touching the store it was given."""
    from model.registry_client import register_same_model
    from service.api.swap_bench import copied_store

    run_id = _new_run(store)
    registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    (tmp_path / "copy").mkdir()
    copy = copied_store(store, tmp_path / "copy")
    assert register_same_model("1", tracking_uri=copy) == "2"
    assert register_same_model("1", tracking_uri=copy) == "3"
    registry.set_alias(registry.CHAMPION, "3", tracking_uri=copy)
    downloaded = registry.download_bundle("3", tmp_path / "v3", tracking_uri=copy)
    assert ModelBundle.load(downloaded).version == ModelBundle.load(bundle_dir).version
    # The store given is as it was: one version, the champion where it was.
    assert registry.get_alias_version(registry.CHAMPION, tracking_uri=store) == "1"
    with pytest.raises(Exception, match="2"):
        registry.download_bundle("2", tmp_path / "absent", tracking_uri=store)


def test_the_swap_benchmark_moves_the_alias_on_schedule_from_a_process_of_its_own(
    store: str, bundle_dir: Path, tmp_path: Path
) -> None:
    """service/api/swap_bench.py's AliasMover: the MLflow client's work stays out of the load generator's process;
    the child connects before it says it is ready, moves at the offsets after ``go``, and names why it failed."""
    from model.registry_client import register_same_model
    from service.api.bench import bench_env
    from service.api.swap_bench import AliasMover

    run_id = _new_run(store)
    registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    assert register_same_model("1", tracking_uri=store) == "2"
    env = bench_env(tmp_path)
    with AliasMover(store, ["2", "1"], [0.0, 1.0], env=env, log_file=tmp_path / "mover.log") as mover:
        mover.wait_ready(120)
        time.sleep(0.5)
        assert registry.get_alias_version(registry.CHAMPION, tracking_uri=store) == "1"  # nothing moves before go
        mover.go()
        moved_at = mover.moved_at(timeout=120)
    assert len(moved_at) == 2
    assert 0.0 <= moved_at[0] < 1.0 <= moved_at[1]
    assert registry.get_alias_version(registry.CHAMPION, tracking_uri=store) == "1"
    with AliasMover(store, ["99"], [0.0], env=env, log_file=tmp_path / "failing.log") as mover:
        mover.wait_ready(120)
        mover.go()
        with pytest.raises(RuntimeError, match=r"the alias mover failed after 0 moves \(exit code 1\): .*99"):
            mover.moved_at(timeout=120)


def test_the_swap_probe_swaps_a_real_store_s_champion_beside_a_requests_thread(
    store: str, bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """service/api/swap_probe.py, shortened: the runtime of a worker reads a mirror of a copy of the store, every
    swap loads and serves the version the alias moved to, requests are timed on both sides, and a swap that does not
    serve its version, or a request that fails, ends the run naming it."""
    from service.api.mirror import MirrorSource
    from service.api.model_holder import ModelHolder
    from service.api.swap_bench import versions_to_swap
    from service.api.swap_probe import run_swap_probe

    with pytest.raises(ValueError, match="no champion in"):
        run_swap_probe(store, swaps=1, pause_seconds=0.1)
    run_id = _new_run(store)
    registry.register_bundle(bundle_dir, run_id, tracking_uri=store)
    registry.set_alias(registry.CHAMPION, "1", tracking_uri=store)
    # The versions to move through end with the champion, so the first move is a real swap.
    (tmp_path / "copy").mkdir()
    _, versions = versions_to_swap(store, tmp_path / "copy")
    assert versions == ["2", "3", "1"]
    threads_before = _lightgbm_max_threads()
    blas_before = _blas_threads()
    blas_in_loads: list[set[int]] = []
    real_refresh = ModelHolder.refresh

    def counting_blas_threads(self: ModelHolder) -> bool:
        blas_in_loads.append(_blas_threads())
        return real_refresh(self)

    with monkeypatch.context() as patched:
        patched.setattr(ModelHolder, "refresh", counting_blas_threads)
        result = run_swap_probe(store, swaps=3, pause_seconds=0.3)
    assert _lightgbm_max_threads() == threads_before  # one thread for LightGBM during the probe only
    assert len(blas_in_loads) == 4  # the first load, then three swaps
    assert all(counts == {1} for counts in blas_in_loads)  # BLAS on one thread in each, as in a worker
    assert _blas_threads() == blas_before
    assert result.swaps == 3
    assert len(result.load_ms) == 3
    assert min(result.load_ms) > 1.0  # each a real load of a bundle, not a refresh that found nothing new
    assert result.away.requests > 20
    assert result.during.requests > 0
    assert 0 < result.away.decide_p50_ms <= result.away.decide_p90_ms
    # The store given is as it was: its champion is still version 1, and no version was added to it.
    assert registry.get_alias_version(registry.CHAMPION, tracking_uri=store) == "1"
    with pytest.raises(Exception, match="2"):
        registry.download_bundle("2", tmp_path / "absent", tracking_uri=store)

    real_load = MirrorSource.load

    def unreadable(self: MirrorSource, version: str) -> object:
        if version == "2":
            raise OSError(f"version {version} unreadable")
        return real_load(self, version)

    with monkeypatch.context() as patched:
        patched.setattr(MirrorSource, "load", unreadable)
        with pytest.raises(RuntimeError, match=r"swap 1 did not serve version 2 \(serving 1: .*version 2 unreadable"):
            run_swap_probe(store, swaps=1, pause_seconds=0.1)

    from service.api.deps import Runtime

    real_decide = Runtime._decide
    calls = {"n": 0}

    def fails_after_warming(self: Runtime, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > 400:  # the warm-up decides the traffic once (384 requests), then the stand-in thread
            raise ZeroDivisionError("boom")
        return real_decide(self, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(Runtime, "_decide", fails_after_warming)
        with pytest.raises(RuntimeError, match=r"a stand-in request failed: ZeroDivisionError\('boom'\)"):
            run_swap_probe(store, swaps=2, pause_seconds=0.3)


def _blas_threads() -> set[int]:
    """The thread counts of the BLAS libraries loaded in this process (numpy's OpenBLAS at least)."""
    from threadpoolctl import threadpool_info

    return {int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"}


def _lightgbm_max_threads() -> int:
    import ctypes

    from lightgbm.basic import _LIB  # type: ignore[attr-defined]

    count = ctypes.c_int(0)
    _LIB.LGBM_GetMaxThreads(ctypes.byref(count))
    return int(count.value)


def test_lightgbm_runs_one_thread_within_lightgbm_threads_and_as_before_after() -> None:
    from model.fastpredict import lightgbm_threads

    before = _lightgbm_max_threads()
    with lightgbm_threads(1):
        assert _lightgbm_max_threads() == 1
        seen: list[int] = []

        def fail_inside() -> None:
            with lightgbm_threads(2):
                seen.append(_lightgbm_max_threads())
                raise RuntimeError("inner")

        with pytest.raises(RuntimeError, match="inner"):
            fail_inside()
        assert seen == [2]
        assert _lightgbm_max_threads() == 1
    assert _lightgbm_max_threads() == before


def test_a_store_migration_that_fails_says_at_which_step() -> None:
    # MLflow's migrations of a new store are logged as one line once done (not 67), and one that fails at a step
    # still says which; alembic's warnings pass as they are.
    import logging

    from model.registry_client import _migrations_in_one_line

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger("alembic.runtime.migration"), logging.getLogger("winback.registry")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    alembic = loggers[0]

    def migrate() -> None:
        with _migrations_in_one_line("sqlite:////srv/mlflow.db"):
            alembic.info("Running %s", "upgrade  -> a1, add metric step")
            alembic.info("Running %s", "upgrade a1 -> b2, add tags")
            alembic.warning("a warning of alembic's own")
            raise RuntimeError("disk I/O error")

    try:
        with pytest.raises(RuntimeError, match="disk I/O error"):
            migrate()
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert seen == [
        "a warning of alembic's own",
        "migrating the MLflow store sqlite:////srv/mlflow.db failed at step 2: upgrade a1 -> b2, add tags",
    ]


def test_a_tracking_block_leaves_no_registry_behind(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``tracking(store)``, a client of another store, and a child process, use that store's registry: the
    registry URI was left set (in the process and exported to children), and a later client registered there."""
    import os

    import mlflow

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with registry.tracking(store):
        pass
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert mlflow.MlflowClient(tracking_uri=other)._registry_uri == other


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlruns/mlflow.db",
        "sqlite://",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "databricks",
        "databricks://profile",
        "postgresql://winback@db/mlflow",
        "postgresql+psycopg://winback@db/mlflow",
    ],
)
def test_every_scheme_mlflow_has_a_store_for_is_taken_without_contacting_it(uri: str) -> None:
    registry_client.refuse_a_store_that_cannot_work(uri)  # none of these hosts exists: nothing is contacted


@pytest.mark.parametrize("uri", ["mlruns", "/srv/mlruns", "file:///srv/mlruns"])
def test_a_file_store_is_taken_when_mlflow_is_allowed_to_open_one(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for allowed in ("true", "1", "TRUE"):
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", allowed)
        registry_client.refuse_a_store_that_cannot_work(uri)
    assert not Path("/srv/mlruns").exists()  # nothing is created either


def _absent(*modules: str) -> None:
    """The drivers the refusals below are about are no dependency of winback; installed, the case says nothing."""
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is not None:
            pytest.skip(f"{module} is installed here")


#: Tracking URIs this install can never use, and what the refusal must say (its reason and the way out).
NEVER_USABLE = [
    ("mysql://winback:s3cret@db/mlflow", ("MySQLdb", "not installed", "install mysqlclient", "mysql+<driver>://")),
    ("mysql+pymysql://winback@db/mlflow?password=s3cret", ("pymysql", "not installed", "install pymysql")),
    ("mssql://db/mlflow", ("pyodbc", "install pyodbc")),
    ("mysql+nodriver://db/mlflow", ("SQLAlchemy cannot build an engine for it", "mysql.nodriver")),
    ("postgresql://winback:s3cret@db:fivefour/mlflow", ("SQLAlchemy cannot build an engine for it", "fivefour")),
    ("mlruns", ("opens a file store only when MLFLOW_ALLOW_FILE_STORE=true", "or use sqlite:///mlruns/mlflow.db")),
    ("file:///srv/mlruns", ("MLFLOW_ALLOW_FILE_STORE=true", "mlflow migrate-filestore")),
    ("databricks-uc", ("Unity Catalog URI as a model registry only", "use databricks, an http(s)://")),
    ("databricks-uc://profile", ("Unity Catalog",)),
    ("uc:http://127.0.0.1:8080", ("Unity Catalog",)),
]


@pytest.mark.parametrize(("uri", "says"), NEVER_USABLE)
def test_a_store_this_install_can_never_open_is_refused_in_one_line_naming_the_fix(
    uri: str, says: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """They passed the scheme check: `winback serve` and `executor run` started, decided rules-only for ever and
    said why only in /readyz; `winback train` ended a missing driver in a traceback."""
    _absent("MySQLdb", "pymysql", "pyodbc")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(registry_client.RegistryError) as refused:
        registry_client.refuse_a_store_that_cannot_work(uri)
    message = str(refused.value)
    assert message.startswith(f"cannot use the MLflow tracking store {registry_client.shown_uri(uri)}: "), message
    for words in says:
        assert words in message, message
    assert "\n" not in message
    assert "s3cret" not in message


@pytest.mark.parametrize("uri", [uri for uri, _ in NEVER_USABLE])
def test_mlflow_itself_cannot_open_what_is_refused(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals above stand for MLflow's own: its client, given the URI, fails before contacting anything. (A
    newer MLflow that opens one of them fails this test: the refusal is then to go.)"""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    _absent("MySQLdb", "pymysql", "pyodbc")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises((MlflowException, ImportError, SQLAlchemyError, ValueError)):
        MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_file_store_flag_mlflow_cannot_read_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")
    with pytest.raises(registry_client.RegistryError) as refused:
        registry_client.refuse_a_store_that_cannot_work("mlruns")
    assert "MLFLOW_ALLOW_FILE_STORE='yes' is not one of true, false, 1, 0" in str(refused.value)


@pytest.mark.parametrize("uri", ["bogus://x", "s3://bucket/mlruns", "postgres://winback:s3cret@db/mlflow"])
def test_a_scheme_no_mlflow_store_takes_is_refused_in_one_line(uri: str) -> None:
    with pytest.raises(registry_client.RegistryError) as refused:
        registry_client.refuse_a_store_that_cannot_work(uri)
    message = str(refused.value)
    assert message.startswith(f"cannot use the MLflow tracking store {registry_client.shown_uri(uri)}: "), message
    assert "got unsupported URI" in message
    assert "\n" not in message
    assert "s3cret" not in message
