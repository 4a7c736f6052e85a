"""Where winback's shipped reference data lives, in a checkout and in an installed package.

The reference data (error-code catalog, hard rules, economics, priors, message templates, the demo merchant
config and request) is kept in ``data/`` at the top of the repository. A wheel cannot carry a top-level ``data/``
folder, so ``pyproject.toml`` ships that folder as the package ``model._data``. Code must therefore not build
data paths from its own ``__file__``: every such path starts from :data:`DATA_DIR`, resolved here once.

- Installed from a wheel (or ``pip install .``): ``model/_data/`` inside the installed package.
- Running from the source tree (``pip install -e``, the tests): the checkout's ``data/``; there is no
  ``model/_data/`` folder in the repository, so the packaged copy is never mistaken for it.
"""

from __future__ import annotations

from pathlib import Path

_MODEL_DIR = Path(__file__).resolve().parent
#: The copy a wheel carries: ``pyproject.toml`` maps the package ``model._data`` to ``data/``.
_PACKAGED_DATA = _MODEL_DIR / "_data"
#: ``data/`` of the source tree, beside the ``model`` package.
_CHECKOUT_DATA = _MODEL_DIR.parent / "data"

#: True when winback runs from its source tree rather than from an installed copy.
FROM_CHECKOUT: bool = not _PACKAGED_DATA.is_dir()
#: The shipped reference data: ``data/`` of the checkout, else ``model/_data`` of the installed package.
DATA_DIR: Path = _CHECKOUT_DATA if FROM_CHECKOUT else _PACKAGED_DATA
#: The demo merchant config (CONTRACT.md section 1: ``--config`` defaults to it; the simulator's merchants).
DEMO_MERCHANTS_FILE: Path = DATA_DIR / "demo" / "merchants.yaml"
#: The demo decision request (CONTRACT.md section 2, merchant ``m_us_saas``).
DEMO_REQUEST_FILE: Path = DATA_DIR / "demo" / "request.json"
#: Where winback commands write generated data by default. In a checkout: ``data/generated/`` (ignored by git).
#: Installed, the package folder is no place to write (site-packages may be read-only and is shared), so it is
#: ``generated/`` relative to the current directory, resolved when written, like ``winback.db`` and ``mlruns/``.
GENERATED_DIR: Path = _CHECKOUT_DATA / "generated" if FROM_CHECKOUT else Path("generated")
