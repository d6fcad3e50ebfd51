"""The install is locked: every package the project needs, at one version, with hashes, in the files
`make` and the image install from, and both files agree. A `>=` range in an install would take whatever is
newest on the index that day (LiteLLM's releases 1.82.7-8 on PyPI shipped a credential stealer)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for every requirement in a pip-compile output."""
    out: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonical(m.group(1))
            out[current] = (m.group(2), 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, n = out[current]
            out[current] = (version, n + 1)
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"{path.name}: not a pinned requirement: {line!r}")
    return out


def declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = project["project"]["dependencies"] if extra is None else project["project"]["optional-dependencies"][extra]
    reqs = reqs + project["build-system"]["requires"]
    return {canonical(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}


def test_every_locked_package_is_pinned_with_hashes():
    for lock in (REPO / "requirements.lock", REPO / "compose" / "requirements.lock"):
        locked = pins(lock)
        assert locked, f"{lock} pins nothing"
        unhashed = [name for name, (_, hashes) in locked.items() if hashes == 0]
        assert not unhashed, f"{lock.name}: no hashes for {unhashed}"


def test_the_locks_cover_what_pyproject_declares_and_agree_on_versions():
    full = pins(REPO / "requirements.lock")
    image = pins(REPO / "compose" / "requirements.lock")
    assert declared() | declared("dev") <= set(full), sorted((declared() | declared("dev")) - set(full))
    assert declared() <= set(image), sorted(declared() - set(image))
    assert {n: v for n, (v, _) in image.items()} == {n: full[n][0] for n in image}


def test_make_and_the_image_install_only_from_the_locks():
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    assert "--upgrade pip" not in makefile
    dockerfile = (REPO / "compose" / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    installs = re.findall(r"pip install [^\n\\]*", dockerfile)
    assert all("--no-deps" in line for line in installs), installs
