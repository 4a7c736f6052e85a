"""constraints.txt, the versions `make install` pins, stays in step with pyproject.toml: a dependency added to
pyproject.toml without `make lock` would be installed at whatever version the index serves that day, and a pin
outside pyproject's range would make pip refuse the install on a fresh machine."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, Version]:
    pinned: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not a name==version pin"
        pinned[canonicalize_name(name)] = Version(version)
    return pinned


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [spec for specs in project["optional-dependencies"].values() for spec in specs]
    return [Requirement(spec) for spec in [*project["dependencies"], *extras]]


def test_every_declared_dependency_is_pinned_inside_its_declared_range() -> None:
    pinned = pins()
    unpinned = [str(req) for req in declared() if canonicalize_name(req.name) not in pinned]
    assert not unpinned, f"not in constraints.txt (run `make lock`): {unpinned}"
    outside = [
        f"{req} but constraints.txt pins {pinned[canonicalize_name(req.name)]}"
        for req in declared()
        if not req.specifier.contains(pinned[canonicalize_name(req.name)], prereleases=True)
    ]
    assert not outside, outside
