"""The workspace's packaging: ``uv run pytest`` inside an assignment folder installs that member's
own dev group (not the root's), so each member must declare what its tests import."""

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = ["assignment1", "assignment2", "assignment5"]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml"}


def _requirement_names(reqs: list[str]) -> set[str]:
    names = set()
    for req in reqs:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def _test_imports(folder: Path) -> set[str]:
    """Top-level modules imported anywhere in ``folder``'s test files (function bodies included)."""
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("member", MEMBERS)
def test_member_declares_what_its_tests_import(member):
    project = tomllib.loads((ROOT / member / "pyproject.toml").read_text())
    declared = _requirement_names(project["project"]["dependencies"])
    declared |= _requirement_names(project.get("dependency-groups", {}).get("dev", []))
    assert {"pytest", "pytest-timeout"} <= declared, f"{member}: no dev group with pytest"
    local = {"cs336_basics", "cs336_systems", "cs336_alignment", "adapters", "conftest"}
    third_party = {m for m in _test_imports(ROOT / member / "tests")
                   if m not in sys.stdlib_module_names and m not in local and not m.startswith("test_")}
    missing = {m for m in third_party if DISTRIBUTIONS.get(m, m).replace("_", "-") not in declared}
    assert not missing, f"{member}/tests import {sorted(missing)}, which {member}/pyproject.toml does not declare"
