"""Every dependency earns its place (docs/installation.md): each core one is used by the package, nothing
outside them is imported at module level, and the optional ones fail with an error naming their extra."""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from misbench.datasets.sources import load_data
from misbench.errors import MisbenchError

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"faiss-cpu": "faiss", "faiss-gpu": "faiss", "pillow": "PIL", "scikit-learn": "sklearn"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _modules_of(requirements) -> set[str]:
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
    return {IMPORT_NAMES.get(n, n) for n in names}


CORE = _modules_of(PROJECT["dependencies"])


def _third_party_imports():
    """(top-level module, at module level?) for every import in misbench/ and cli/."""
    found = []
    for path in list((ROOT / "misbench").rglob("*.py")) + list((ROOT / "cli").rglob("*.py")):
        tree = ast.parse(path.read_text())
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "misbench":
                    found.append((top, id(node) not in local, f"{path.relative_to(ROOT)}:{node.lineno}"))
    return found


def test_every_core_dependency_is_used_and_nothing_else_is_needed_to_import():
    imports = _third_party_imports()
    assert CORE <= {top for top, _, _ in imports}, f"core dependencies nothing imports: {CORE - {t for t, _, _ in imports}}"
    undeclared = [f"{where} {top}" for top, module_level, where in imports if module_level and top not in CORE]
    assert not undeclared, "module-level imports of packages that are not core dependencies:\n" + "\n".join(undeclared)
    optional = set().union(*map(_modules_of, PROJECT["optional-dependencies"].values()))
    lazily = {top for top, module_level, _ in imports if not module_level}
    assert lazily <= CORE | optional, f"imported but declared nowhere: {lazily - CORE - optional}"


def test_scikit_learn_is_the_toy_extra_only():
    assert "sklearn" not in CORE and "sklearn" in _modules_of(PROJECT["optional-dependencies"]["toy"])
    users = {where.split(":")[0] for top, _, where in _third_party_imports() if top == "sklearn"}
    assert users == {str(Path("misbench/datasets/sources.py"))}


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what an absent package looks like to import
    with pytest.raises(MisbenchError, match=re.escape("pip install 'misbench[toy]'")):
        load_data("digits")
    monkeypatch.undo()
    assert len(load_data("digits")) == 1797
