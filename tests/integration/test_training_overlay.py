"""The gateway status map overlay a model was trained with travels with it, against a real MLflow store in a temp dir.

`winback train` reads ``WINBACK_GSM_OVERLAY`` as the scorer does, so a code only the overlay defines gets the same
feature values in training and in serving; the version carries the overlay as a pyfunc artifact, and the pyfunc
serves with it in a process without the variable; a model trained without an overlay, served with one, is still
reported as trained with another catalog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from model import registry
from model import training as training_module
from model.catalog import load_catalog
from model.gsm import GSM_OVERLAY_KEY, overlay_digest, serving_catalog, with_overlay, write_overlay
from model.policy import PolicyConfig, decide
from model.registry import default_merchant
from model.training import decision_points, request_at
from pipelines.train import TrainSummary
from service.api import app as app_module
from tests.factories import GSM_ONLY_CODE, make_history_frames
from tests.integration.test_train_pipeline import _train as train_and_promote
from tests.integration.test_train_pipeline import _write_frames
from tests.unit.test_api import settings_for

#: The columns of a decision's features that come from the error catalog's verdict (model.features.catalog_columns).
CATALOG_COLUMNS = ("error_class", "known_code", "visa_category", "mac_never_retry")


def _history_with_overlay_code(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A history whose stripe processing errors carry a code only the overlay defines (no message, no network
    code: only the overlay can tell what it is)."""
    attempts, nudges = make_history_frames(600, seed=seed)
    rows = (attempts["connector"] == "stripe") & (attempts["error_code"] == "processing_error")
    assert rows.sum() >= 20
    attempts.loc[rows, "error_code"] = GSM_ONLY_CODE.code
    attempts.loc[rows, ["error_message", "network_decline_code"]] = None
    return attempts, nudges


@dataclass
class Trained:
    summary: TrainSummary
    store: str
    overlay: Path
    attempts: pd.DataFrame
    nudges: pd.DataFrame
    output: str
    #: Training's catalog columns of each decision point whose failure carries the overlay's code, by order and time.
    features: dict[tuple[str, float], dict[str, Any]]


def _train(folder: Path, *, with_overlay_set: bool) -> Trained:
    attempts, nudges = _history_with_overlay_code(seed=11)
    overlay = write_overlay([GSM_ONLY_CODE], folder / "overlay.csv")
    store = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    seen: dict[tuple[str, float], dict[str, Any]] = {}
    real_raw_columns = training_module.raw_columns

    def recording_raw_columns(points: pd.DataFrame, catalog: Any) -> dict[str, np.ndarray]:
        # The real function, its answers kept for the overlay's code: what training's features read.
        cols = real_raw_columns(points, catalog)
        for row in np.flatnonzero((points["error_code"] == GSM_ONLY_CODE.code).to_numpy(dtype=bool)):
            key = (str(points["order_id"].iloc[row]), float(cols["event_ts"][row]))
            seen[key] = {name: cols[name][row] for name in CATALOG_COLUMNS}
        return cols

    console = Console(width=300, record=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # no .env of the checkout
        patch.delenv("WINBACK_GSM_OVERLAY", raising=False)
        if with_overlay_set:
            patch.setenv("WINBACK_GSM_OVERLAY", str(overlay))
        patch.setattr(training_module, "raw_columns", recording_raw_columns)
        summary = train_and_promote(_write_frames(folder / "history", attempts, nudges), store, console)
    assert seen, "training built no decision point after the overlay's code"
    return Trained(summary, store, overlay, attempts, nudges, console.export_text(), seen)


@pytest.fixture(scope="module")
def trained_with_overlay(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(tmp_path_factory.mktemp("with-overlay"), with_overlay_set=True)


@pytest.fixture(scope="module")
def trained_without_overlay(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(tmp_path_factory.mktemp("without-overlay"), with_overlay_set=False)


@pytest.fixture
def no_overlay_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A process without WINBACK_GSM_OVERLAY (nor a .env that sets it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WINBACK_GSM_OVERLAY", raising=False)


def _serving(trained: Trained, tmp_path: Path, overlay: Path | None) -> Any:
    """The decision API's runtime with ``overlay``, its holder serving the registered champion."""
    runtime = app_module.build_runtime(
        settings_for(tmp_path, gsm_overlay=overlay, load_model=True, tracking_uri=trained.store)
    )
    runtime.holder.refresh()
    assert runtime.holder.current.version == trained.summary.version
    return runtime


def _overlay_requests(trained: Trained, limit: int = 10) -> list[tuple[tuple[str, float], Any]]:
    points = decision_points(trained.attempts, trained.nudges)
    out = []
    for position in range(len(points)):
        point = {str(k): v for k, v in points.iloc[position].items()}
        request, _ = request_at(trained.attempts, trained.nudges, point)
        if request.failure.error_code == GSM_ONLY_CODE.code:
            out.append(((str(point["order_id"]), request.event_time.timestamp()), request))
        if len(out) >= limit:
            break
    return out


def _same(a: Any, b: Any) -> bool:
    missing = (a is None or (isinstance(a, float) and np.isnan(a)), b is None or (isinstance(b, float) and np.isnan(b)))
    return all(missing) or (not any(missing) and a == b)


def test_a_code_only_the_overlay_defines_gets_the_same_features_in_training_and_serving(
    trained_with_overlay: Trained, tmp_path: Path, no_overlay_env: None
) -> None:
    """`winback train` read the shipped catalog whatever WINBACK_GSM_OVERLAY said: a code only the overlay defines
    was an unknown code to training (error class unknown, not a known code) and a processor-technical, known code
    to the scorer serving with the same overlay."""
    trained = trained_with_overlay
    runtime = _serving(trained, tmp_path, trained.overlay)
    scorer = runtime.holder.current.scorer
    requests = _overlay_requests(trained)
    assert requests

    compared = 0
    for key, request in requests:
        if key not in trained.features:
            continue
        served = scorer.context(request)
        learned = trained.features[key]
        assert all(_same(learned[name], served[name]) for name in CATALOG_COLUMNS), (learned, served)
        assert (learned["error_class"], learned["known_code"]) == ("processor_technical", 1.0)
        compared += 1
    assert compared
    assert runtime.holder.current.catalog_mismatch is None  # trained with the catalog it serves with


def test_train_says_and_logs_the_overlay_its_version_was_trained_with(
    trained_with_overlay: Trained, trained_without_overlay: Trained, no_overlay_env: None
) -> None:
    import mlflow

    trained = trained_with_overlay
    digest = overlay_digest(trained.overlay)
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE]).version
    assert trained.summary.gsm_overlay is not None
    assert trained.summary.gsm_overlay.sha256 == digest
    assert (
        f"version {trained.summary.version} was trained with error catalog {overlaid} and gateway status map "
        f"overlay {trained.overlay} (sha256 {digest})"
    ) in trained.output
    assert (
        f"version {trained_without_overlay.summary.version} was trained with error catalog {load_catalog().version} "
        "and no gateway status map overlay (WINBACK_GSM_OVERLAY is not set)"
    ) in trained_without_overlay.output

    bundle = registry.load_version(trained.summary.version, tracking_uri=trained.store)
    assert bundle.catalog_version == overlaid
    assert bundle.metadata[GSM_OVERLAY_KEY] == {"file": str(trained.overlay), "sha256": digest}
    run = mlflow.MlflowClient(tracking_uri=trained.store).get_run(trained.summary.run_id)
    assert (run.data.params["gsm_overlay"], run.data.params["gsm_overlay_sha256"]) == (str(trained.overlay), digest)


def test_the_pyfunc_serves_with_its_training_overlay_where_the_variable_is_not_set(
    trained_with_overlay: Trained, tmp_path: Path, no_overlay_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The registered pyfunc read WINBACK_GSM_OVERLAY of the process loading it: loaded without it (batch
    scoring, `mlflow models serve` elsewhere), a code only the training overlay defines was unknown to its rules
    and features."""
    import mlflow.pyfunc

    trained = trained_with_overlay
    with caplog.at_level(logging.INFO, logger="winback.registry"), registry.tracking(trained.store):
        model = mlflow.pyfunc.load_model(f"models:/{registry.MODEL_NAME}/{trained.summary.version}")
    pyfunc = model.unwrap_python_model()
    (_, request), *_ = _overlay_requests(trained, limit=1)

    out = model.predict(pd.DataFrame({"request": [request.model_dump_json()]}))
    runtime = _serving(trained, tmp_path, trained.overlay)  # the API, with the overlay the model was trained with
    api = decide(request, default_merchant(request), runtime.holder.current.scorer, catalog=runtime.catalog,
                 config=PolicyConfig(), rng=np.random.default_rng(0))  # fmt: skip

    assert pyfunc._bundle.context(request)["known_code"] == 1.0
    assert pyfunc._catalog.version == runtime.catalog.version
    row = out.iloc[0]
    assert (row["action"], bool(row["retryable"])) == (str(api.action), api.retryable)
    assert row["retry_probability"] == pytest.approx(api.retry_probability)
    said = [record.getMessage() for record in caplog.records if record.name == "winback.registry"]
    assert any(
        f"serves with the error catalog it was trained with: gateway status map overlay {trained.overlay} "
        f"(sha256 {overlay_digest(trained.overlay)})" in message
        for message in said
    ), said


def test_a_model_trained_without_an_overlay_served_with_one_is_still_a_mismatch(
    trained_without_overlay: Trained,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_overlay_env: None,
) -> None:
    """The scorer decides its own catalog (its WINBACK_GSM_OVERLAY): a model trained without that overlay is said
    to be trained with another catalog; its pyfunc serves with the catalog it was trained with, and says that the
    loading process's overlay is not read."""
    import mlflow.pyfunc

    trained = trained_without_overlay
    shipped, overlaid = load_catalog().version, with_overlay(load_catalog(), [GSM_ONLY_CODE]).version
    runtime = _serving(trained, tmp_path, trained.overlay)
    assert runtime.holder.current.catalog_mismatch == (
        f"trained with error catalog {shipped}, serving with error catalog {overlaid}"
    )

    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(trained.overlay))
    with caplog.at_level(logging.INFO, logger="winback.registry"), registry.tracking(trained.store):
        model = mlflow.pyfunc.load_model(f"models:/{registry.MODEL_NAME}/{trained.summary.version}")
    pyfunc = model.unwrap_python_model()
    assert pyfunc._catalog.version == shipped
    said = [record.getMessage() for record in caplog.records if record.name == "winback.registry"]
    assert any(f"WINBACK_GSM_OVERLAY={trained.overlay} is not read" in message for message in said), said


@pytest.mark.parametrize("command", ["train", "retrain"])
def test_an_overlay_training_cannot_read_stops_the_job_before_any_work(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line naming the variable and the file, exit 2, and no MLflow store created: the job did not train
    with the shipped catalog instead of the overlay the scorer serves with."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    attempts, nudges = _write_frames(tmp_path / "history", *make_history_frames(50, seed=2))
    missing = tmp_path / "no-such-overlay.csv"
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(missing))
    store = tmp_path / "store" / "mlflow.db"
    arguments = [command, "--attempts", str(attempts), "--nudges", str(nudges), "--tracking-uri", f"sqlite:///{store}"]

    result = CliRunner().invoke(app, arguments)

    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: WINBACK_GSM_OVERLAY: {missing}: no such overlay file (create it with `winback codes import-gsm "
        "FILE.csv`)"
    ]
    assert not store.parent.exists()


def test_winback_evaluate_replays_a_version_with_the_overlay_it_was_trained_with(
    trained_with_overlay: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`winback evaluate` loaded the version and replayed it, and the rule baselines beside it, with the shipped
    catalog: the holdout's failures with a code only the training overlay defines were of error class unknown. The
    operator's own WINBACK_GSM_OVERLAY (another file here) is said not to be read."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    trained = trained_with_overlay
    monkeypatch.chdir(tmp_path)
    other = write_overlay([], tmp_path / "other-overlay.csv")
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(other))
    attempts, nudges = _write_frames(tmp_path / "history", trained.attempts, trained.nudges)
    out = tmp_path / "evaluation"
    arguments = ["evaluate", "--attempts", str(attempts), "--nudges", str(nudges), "--out", str(out)]

    result = CliRunner().invoke(app, [*arguments, "--tracking-uri", trained.store, "--episodes", "0"])

    assert result.exit_code == 0, result.output
    # Every other code of the history is one the shipped catalog knows: only the overlay's could be unknown.
    by_class = pd.read_csv(out / "retryability_by_error_class.csv", index_col=0)
    assert "unknown" not in by_class.index, by_class
    assert by_class.loc["processor_technical", "points"] > 0
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE]).version
    lines = result.stdout.splitlines()
    assert (
        f"model {trained.summary.version} is evaluated with the error catalog it was trained with: {overlaid}, "
        f"gateway status map overlay {trained.overlay} (sha256 {overlay_digest(trained.overlay)})"
    ) in lines
    assert (
        f"note: WINBACK_GSM_OVERLAY={other} is not read: model {trained.summary.version} is evaluated with the "
        "overlay it was trained with"
    ) in lines


def _history_folder(trained: Trained, folder: Path) -> Path:
    """The trained history as a simulated history's folder (attempts, nudges and an empty stops file)."""
    from model.history import write_stops
    from tests.factories import make_stops_frame

    _write_frames(folder, trained.attempts, trained.nudges)
    write_stops(make_stops_frame({"order_id": "ord_0"}).iloc[0:0], folder / "stops.parquet")
    return folder


def _registered_again(sources: list[Trained], store: str, *, alias: str | None = None) -> list[str]:
    """Each source's registered version (its bundle and the overlay it was trained with) registered again, in order,
    as a new version of the store ``store``; the last one gets ``alias``."""
    import tempfile

    import mlflow

    from model.bundle import saved_metadata

    versions = []
    for position, source in enumerate(sources, start=1):
        with tempfile.TemporaryDirectory() as tmp:
            bundle_dir = registry.download_bundle(source.summary.version, tmp, tracking_uri=source.store)
            trained_with = saved_metadata(bundle_dir).get(GSM_OVERLAY_KEY)
            experiment = registry.ensure_experiment(store)
            run_id = mlflow.MlflowClient(tracking_uri=store).create_run(experiment).info.run_id
            versions.append(
                registry.register_bundle(
                    bundle_dir,
                    run_id,
                    tracking_uri=store,
                    alias=alias if position == len(sources) else None,
                    gsm_overlay=None if trained_with is None else source.overlay,
                )
            )
    return versions


def test_codes_report_estimates_a_code_only_the_overlay_defines_with_the_version_s_catalog(
    trained_with_overlay: Trained, tmp_path: Path, no_overlay_env: None
) -> None:
    """`winback codes report` scored the champion's typical failure with a code only its training overlay defines
    with the shipped catalog's rules (an unknown code to them), and said nothing of the catalog it read."""
    from model.codewatch import new_codes_report
    from pipelines.codes import codes_report

    trained = trained_with_overlay
    attempts, nudges = _write_frames(tmp_path / "history", trained.attempts, trained.nudges)
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE]).version

    report = codes_report(attempts, nudges, tracking_uri=trained.store, min_support=10**9)

    assert report.catalog_lines == [
        f"model {trained.summary.version} is evaluated with the error catalog it was trained with: {overlaid}, "
        f"gateway status map overlay {trained.overlay} (sha256 {overlay_digest(trained.overlay)})"
    ]
    from model.history import read_history
    from pipelines.train import merchants_for

    # What the version itself estimates for that code, with the catalog it was trained with and with the shipped one.
    loaded = registry.load_trained_version(trained.summary.version, tracking_uri=trained.store)
    history = read_history(attempts, nudges)
    estimates = {
        catalog.version: new_codes_report(
            loaded.bundle,
            history.attempts,
            min_support=10**9,
            merchants=merchants_for(history.attempts),
            catalog=catalog,
        ).set_index("error_code")["retry_probability"]
        for catalog in (loaded.catalog, load_catalog())
    }
    ours, shipped = estimates[overlaid][GSM_ONLY_CODE.code], estimates[load_catalog().version][GSM_ONLY_CODE.code]
    assert ours != pytest.approx(shipped)  # the catalog matters for this code: the check below can fail
    (row,) = report.report[report.report["error_code"] == GSM_ONLY_CODE.code].to_dict("records")
    assert row["retry_probability"] == pytest.approx(ours)


def test_judged_holdout_reads_the_holdout_with_the_catalog_the_versions_were_trained_with(
    trained_with_overlay: Trained, tmp_path: Path, no_overlay_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The OPE tools (gate_check, ope_bias) read the holdout's logged decisions with the shipped catalog: a failure
    with a code only the versions' training overlay defines was of error class unknown to the rules replayed."""
    from pipelines.ope_check import VersionPairCheck, judged_holdout

    trained = trained_with_overlay
    version = trained.summary.version
    history_dir = _history_folder(trained, tmp_path / "history")
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE]).version

    _, logged, _, models, catalog = judged_holdout(
        VersionPairCheck(history_dir, 600, 11, trained.store, (version, version), max_points=500)
    )

    assert catalog.version == overlaid
    assert models[version].catalog_version == overlaid
    ours = logged[logged["error_code"] == GSM_ONLY_CODE.code]
    assert len(ours) > 0
    assert set(ours["error_class"]) == {"processor_technical"}
    said = f"model {version} is evaluated with the error catalog it was trained with: {overlaid}, "
    assert said in capsys.readouterr().out


def test_judged_holdout_refuses_two_versions_trained_with_different_catalogs(
    trained_with_overlay: Trained,
    trained_without_overlay: Trained,
    tmp_path: Path,
    no_overlay_env: None,
) -> None:
    """Two versions trained with different error catalogs cannot share one reading of the holdout: the tool stops
    with one message naming both versions and both catalogs, rather than replaying one with the other's."""
    from pipelines.ope_check import VersionPairCheck, judged_holdout

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    first, second = _registered_again([trained_with_overlay, trained_without_overlay], store)
    history_dir = _history_folder(trained_with_overlay, tmp_path / "history")
    overlaid, shipped = with_overlay(load_catalog(), [GSM_ONLY_CODE]).version, load_catalog().version

    with pytest.raises(SystemExit) as stopped:
        judged_holdout(VersionPairCheck(history_dir, 600, 11, store, (first, second), max_points=500))

    assert str(stopped.value) == (
        f"versions {first} and {second} were trained with different error catalogs "
        f"({', '.join(sorted([overlaid, shipped]))}): their holdout cannot be read with the catalog of both"
    )


@pytest.mark.parametrize("tampered", ["missing", "changed"])
def test_a_version_whose_overlay_artifact_is_missing_or_changed_stops_offline_evaluation_in_one_line(
    tampered: str, trained_with_overlay: Trained, tmp_path: Path, no_overlay_env: None
) -> None:
    """`winback evaluate` and `winback codes report` on a version whose stored overlay is gone or is another file
    than the one its model records: one line naming the version, its overlay and what is wrong, exit 2. The line
    named only the bundle's own id (wb-...), not the registered version to register again."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    trained = trained_with_overlay
    store_dir = tmp_path / "store"
    store = f"sqlite:///{store_dir / 'mlflow.db'}"
    (version,) = _registered_again([trained], store, alias=registry.CHAMPION)
    (stored,) = store_dir.rglob(trained.overlay.name)  # the version's copy
    if tampered == "missing":
        stored.unlink()
        wrong = "but its version carries no 'gsm_overlay' artifact to serve with"
    else:
        stored.write_bytes(stored.read_bytes() + b"\n")
        wrong = f"but its version's 'gsm_overlay' artifact has sha256 {overlay_digest(stored)}"
    digest = overlay_digest(trained.overlay)
    attempts, nudges = _write_frames(tmp_path / "history", trained.attempts, trained.nudges)
    history = ["--attempts", str(attempts), "--nudges", str(nudges), "--tracking-uri", store]
    bundle = registry.load_version(version, tracking_uri=store)

    for command in (["evaluate", "--out", str(tmp_path / "evaluation"), "--episodes", "0"], ["codes", "report"]):
        result = CliRunner().invoke(app, [*command, *history], env={"COLUMNS": "1000"})

        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip().splitlines() == [
            f"error: version {version} of winback: model {bundle.version} was trained with gateway status map "
            f"overlay {trained.overlay} (sha256 {digest}), {wrong}"
        ], command


def test_rules_only_offline_evaluation_says_it_reads_the_catalog_the_rules_are_served_with(
    trained_with_overlay: Trained, tmp_path: Path, no_overlay_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no model registered, `winback evaluate` and `winback codes report` read the catalog a rules-only API and
    executor serve with: the shipped one with the operator's WINBACK_GSM_OVERLAY (they read the shipped one alone,
    and said the variable was not read), and say so."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    trained = trained_with_overlay
    attempts, nudges = _write_frames(tmp_path / "history", trained.attempts, trained.nudges)
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    history = ["--attempts", str(attempts), "--nudges", str(nudges), "--tracking-uri", store]
    line = (
        f"evaluated with the shipped error catalog and the gateway status map overlay {trained.overlay} "
        f"(WINBACK_GSM_OVERLAY), as the rules are served: {serving_catalog(trained.overlay).version} "
        "(no model registered)"
    )
    monkeypatch.setenv("WINBACK_GSM_OVERLAY", str(trained.overlay))

    for command in (["evaluate", "--out", str(tmp_path / "evaluation"), "--episodes", "0"], ["codes", "report"]):
        result = CliRunner().invoke(app, [*command, *history], env={"COLUMNS": "1000"})

        assert result.exit_code == 0, (command, result.output)
        lines = result.stdout.splitlines()
        assert line in lines, (command, result.stdout)
        assert not any("is not read" in shown for shown in lines), (command, result.stdout)
