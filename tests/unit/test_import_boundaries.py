"""The layout's import rules (DESIGN.md "Layout"), read from the source: services share only `schemas/`,
no service imports another, and shipped code (services, schemas, tollway) and the benchmarks never import
the test suite."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORED = ROOT / "bench" / "envs"  # git-ignored: the peers' and tools' virtualenvs `make bench` installs
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())


def imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every absolute import under `folder`, function-level ones included."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if IGNORED in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((str(path.relative_to(ROOT)), node.module))
    return out


@pytest.mark.parametrize("folder", ["services", "schemas", "tollway", "bench"])
def test_nothing_outside_the_tests_imports_them(folder: str) -> None:
    assert [(f, m) for f, m in imports(folder) if m == "tests" or m.startswith("tests.")] == []


def test_schemas_import_no_service_and_no_runtime() -> None:
    assert [(f, m) for f, m in imports("schemas") if m.split(".")[0] in ("services", "tollway")] == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = [(f, m) for f, m in imports(f"services/{service}")
              if m.startswith("services.") and m.split(".")[1] != service]  # fmt: skip
    assert others == []
