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
def test_dry_run_is_a_papermill_parameter_that_reaches_the_profile(nb):
    params = papermill.inspect_notebook(str(nb))
    assert params["dry_run"]["default"] == "False"
    source = "".join("".join(c["source"]) for c in _code_cells(nb))
    assert "profiles.get(profile, dry_run=dry_run)" in source


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_with_checked_numbers(nb):
    cells = _code_cells(nb)
    assert all(c["execution_count"] is not None for c in cells if "".join(c["source"]).strip())
    assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    checked = [c for c in cells if "# NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c["outputs"] for c in checked)
    assert max(len("".join(c["source"]).splitlines()) for c in cells) <= 40


def test_checked_cells_tolerate_last_digit_drift_only():
    from nbformat import v4
    from nbval_tolerance import numbers_close, snap_to_reference

    ref = "RD4AD   0.90  0.91 mean 0.923\nOoD AUROC 85.1, 4 items, shape (4, 3, 64, 64)\n"
    assert numbers_close(ref, ref.replace("0.923", "0.916").replace("85.1", "84.0"))  # drift: equal
    assert not numbers_close(ref, ref.replace("0.923", "0.880"))  # a real change in an AUROC
    assert not numbers_close(ref, ref.replace("85.1", "81.0"))  # beyond 2 % of a percentage
    assert not numbers_close(ref, ref.replace("4 items", "5 items"))  # integers are exact
    assert not numbers_close(ref, ref.replace("RD4AD", "RD4AE"))  # so is the text
    assert not numbers_close(ref, ref + "extra line 0.1\n")
    test = [v4.new_output("stream", name="stdout", text=ref.replace("0.923", "0.930")),
            v4.new_output("stream", name="stdout", text="AUROC 0.5\n")]
    refs = [v4.new_output("stream", name="stdout", text=ref),
            v4.new_output("stream", name="stdout", text="AUROC 0.9\n")]
    snapped = snap_to_reference(test, refs)
    assert snapped[0]["text"] == ref and snapped[1]["text"] == "AUROC 0.5\n"  # only the close one is snapped
    assert test[0]["text"] != ref  # the test outputs themselves are not modified


def test_a_wrong_chapter_parameter_stops_at_once_listing_the_valid_values(tmp_path):
    """MDD-Net's benchmark is checked before any data is read (it raised KeyError: 'foo' deep in the chapter)."""
    import time

    t = time.perf_counter()
    with pytest.raises(papermill.PapermillExecutionError, match="benchmark must be one of mvtec, visa, uni-medical"):
        papermill.execute_notebook(str(ROOT / "book" / "mdd_net.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"benchmark": "foo"}, cwd=str(ROOT / "book"), kernel_name="python3",
                                   progress_bar=False)
    assert time.perf_counter() - t < 120
