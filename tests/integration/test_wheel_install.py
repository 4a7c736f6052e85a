"""A built wheel carries the reference data: an installed winback decides without the source tree.

The wheel is built from a copy of the checkout (so the checkout gets no ``build/`` folder and a stray
``data/generated/`` file can be planted), unpacked into a folder and imported from there in a child process that
runs in another directory, with that folder first on ``PYTHONPATH`` (ahead of the editable install's finder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs in the child process: argv[1] is the unpacked wheel, stdin the demo decision request.
_CHILD = """
import json, sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import model, service
for package in (model, service):
    if not Path(package.__file__).resolve().is_relative_to(site):
        sys.exit(f"{package.__name__} was imported from {package.__file__}, not from the unpacked wheel {site}")

from model.catalog import load_catalog
from model.datafiles import DATA_DIR, DEMO_MERCHANTS_FILE
from model.gsm import DEFAULT_OVERLAY
from model.merchant_config import load_config
from model.money import load_economics
from model.policy import decide, load_priors
from model.requests import DecisionRequest
from model.rules import load_rulebook
from service.executor.channels.templates import DEFAULT_TEMPLATES_DIR, validate_templates

catalog = load_catalog()
load_rulebook()
load_priors()
economics = load_economics()
config = load_config(DEMO_MERCHANTS_FILE)
validate_templates(config)
request = DecisionRequest.model_validate_json(sys.stdin.read())
decision = decide(request, config.merchants[request.merchant_id], None, catalog=catalog, economics=economics)
print(json.dumps({
    "data_dir": str(DATA_DIR), "templates_dir": str(DEFAULT_TEMPLATES_DIR), "overlay": str(DEFAULT_OVERLAY),
    "action": decision.action.value, "model_version": decision.model_version,
}))
"""


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("model", "service", "pipelines", "data"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    # Generated output lives in data/generated/ of a checkout; the wheel must not pick it up.
    (source / "data" / "generated").mkdir(exist_ok=True)
    (source / "data" / "generated" / "gsm_overlay.csv").write_text("connector,code\n", encoding="utf-8")
    out = tmp_path / "wheel"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run([*command, "-w", str(out), str(source)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # The data folders (model/_data/*, the console's templates and static files) were no packages of the
    # configuration: every install (`make demo`'s first minutes) printed ten 40-line BuildBackendWarnings that
    # setuptools will stop installing them.
    assert "BuildBackendWarning: Package" not in result.stdout + result.stderr, result.stderr[:3000]
    (wheel,) = out.glob("winback-*.whl")
    return wheel


def test_an_unpacked_wheel_decides_the_demo_request_from_its_own_data(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "model/_data/rules/hard_rules.yaml" in names
    assert "model/_data/catalog/connectors/stripe.csv" in names
    assert "model/_data/templates/_default/email.en.j2" in names
    assert not [name for name in names if "generated" in name or name.startswith("data/")]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINBACK_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    request = (REPO / "data" / "demo" / "request.json").read_text(encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(site)],
        input=request,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(answer["data_dir"]) == (site / "model" / "_data").resolve()
    assert Path(answer["templates_dir"]) == Path(answer["data_dir"]) / "templates"
    # Installed, generated output goes under the working directory, never into the package.
    assert answer["overlay"] == str(Path("generated") / "gsm_overlay.csv")
    assert answer["model_version"] == "rules-only"
    assert answer["action"] in {"retry", "retarget", "stop"}
