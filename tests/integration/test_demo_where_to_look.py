"""What `winback demo` prints before the services start points at files that exist."""

from __future__ import annotations

from pathlib import Path

from model import registry_client
from pipelines.demo import demo_paths, where_to_look


def test_where_to_look_names_the_champions_evaluation_report(tmp_path: Path) -> None:
    """The demo printed `demo/mlruns (artifacts of the training run: evaluation/evaluation.md)`, a folder whose
    report sits three run-id folders further down (`mlruns/artifacts/<run>/artifacts/evaluation/evaluation.md`):
    it now prints the champion's own report, and the folder only when no champion has one."""
    import mlflow

    paths = demo_paths(tmp_path)
    (tmp_path / "mlruns").mkdir()
    lines = where_to_look(paths, "127.0.0.1", 8000).splitlines()
    (label,) = [index for index, line in enumerate(lines) if line.startswith("  evaluation")]
    # Beside its label, or (a long path) alone on the next line.
    assert f"{tmp_path / 'mlruns'} (artifacts of the training run" in "".join(lines[label : label + 2])
    experiment = registry_client.ensure_experiment(paths.tracking_uri)
    with registry_client.tracking(paths.tracking_uri):
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_text("# evaluation\n", "evaluation/evaluation.md")
        client = mlflow.MlflowClient()
        client.create_registered_model(registry_client.MODEL_NAME)
        version = client.create_model_version(
            registry_client.MODEL_NAME, source=f"runs:/{run.info.run_id}/bundle", run_id=run.info.run_id
        )
    registry_client.set_alias("champion", str(version.version), tracking_uri=paths.tracking_uri)
    report = tmp_path / "mlruns" / "artifacts" / run.info.run_id / "artifacts" / "evaluation" / "evaluation.md"
    assert report.read_text() == "# evaluation\n"
    lines = where_to_look(paths, "127.0.0.1", 8000).splitlines()
    assert f"  evaluation      {report}" in lines or f"    {report}" in lines, lines
