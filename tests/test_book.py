"""The book's notebooks follow the rules that keep them runnable and checkable."""
import json
from pathlib import Path

import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _code_cells(nb_path):
    return [c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_notebook_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]} | {c["file"] for c in toc.get("chapters", [])}
    assert {f"book/{p.stem}" for p in NOTEBOOKS} <= files


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_profile_is_a_papermill_parameter(nb):
    params = papermill.inspect_notebook(str(nb))
    assert params["profile"]["default"] == '"smoke"'
    first = _code_cells(nb)[0]
    assert "parameters" in first["metadata"].get("tags", [])
    assert "google.colab" in "".join(first["source"])  # installs uadkit in Colab, nothing elsewhere


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_with_checked_numbers(nb):
    cells = _code_cells(nb)
    assert all(c["execution_count"] is not None for c in cells if "".join(c["source"]).strip())
    assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    checked = [c for c in cells if "# NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c["outputs"] for c in checked)
    assert max(len("".join(c["source"]).splitlines()) for c in cells) <= 40
