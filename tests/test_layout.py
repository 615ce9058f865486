"""The package layout is the architecture (README "Architecture"): the core ``edgemole`` imports no role and no tooling,
no role imports another role or the tooling. Checked on the source's import statements, including imports inside
functions, so a lazy import cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROLES = ("edge_client", "aggregator", "export")
TOOLING = "fleet"


def imported_packages(package: str, root: Path = REPO) -> dict[str, set[str]]:
    """Top-level package of every import in ``package``'s modules, keyed by module path."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        tops: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
        found[str(path.relative_to(root))] = tops
    return found


def test_core_imports_no_role_and_no_tooling() -> None:
    bad = {mod: sorted(tops & {*ROLES, TOOLING}) for mod, tops in imported_packages("edgemole").items()}
    assert {mod: tops for mod, tops in bad.items() if tops} == {}


@pytest.mark.parametrize("role", ROLES)
def test_role_imports_no_other_role_and_no_tooling(role: str) -> None:
    forbidden = ({*ROLES} - {role}) | {TOOLING}
    bad = {mod: sorted(tops & forbidden) for mod, tops in imported_packages(role).items()}
    assert {mod: tops for mod, tops in bad.items() if tops} == {}


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    """The walker finds an import inside a function body (what a lazy role import in the core would look like)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("import json\n\ndef f():\n    from aggregator.service import AggregatorService\n")
    assert imported_packages("pkg", tmp_path) == {"pkg/m.py": {"json", "aggregator"}}


def test_the_command_is_the_tooling_package() -> None:
    """The console script and ``python -m fleet`` both reach ``fleet.cli:main``; ``python -m edgemole`` is gone
    because the core must not import the tooling."""
    text = (REPO / "pyproject.toml").read_text()
    assert 'edgemole = "fleet.cli:main"' in text
    assert (REPO / "fleet" / "__main__.py").exists() and not (REPO / "edgemole" / "__main__.py").exists()
