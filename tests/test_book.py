"""The book's notebooks follow the rules that keep them runnable and checkable."""
import json
from pathlib import Path

import papermill
import pytest
import yaml
from nbval_tolerance import is_checked  # the one definition of a checked cell

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
def test_papermill_sees_every_parameter(nb):
    """Every top-level assignment of the parameters cell is a parameter papermill can list (`papermill --help-notebook`);
    a line it cannot parse (e.g. an `=` inside the comment) drops out of that help, silently."""
    import ast

    source = "".join(_code_cells(nb)[0]["source"])
    lines = [line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
             for line in source.splitlines()]  # a shell or magic line (the Colab install) is no Python
    tree = ast.parse("\n".join(lines))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert assigned and assigned <= set(papermill.inspect_notebook(str(nb)))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_dry_run_and_categories_are_papermill_parameters_that_reach_the_profile(nb):
    params = papermill.inspect_notebook(str(nb))
    assert params["dry_run"]["default"] == "False" and "categories" in params
    source = "".join("".join(c["source"]) for c in _code_cells(nb))
    assert "profiles.get(profile, dry_run=dry_run, only=categories)" in source
    assert "P.pick(" in source  # the subset reaches the chapter's tables


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_users_find_the_data_command_and_a_t4_estimate(nb):
    """Next to the parameters, the (commented) command that fetches the paper profile's data in Colab; in the
    chapter, what a one-category paper run costs on Colab's 16 GB T4 (a printed line of a cost cell)."""
    params = "".join(_code_cells(nb)[0]["source"])
    assert "# !python -m uadkit.fetch " in params
    printed = ["".join(o.get("text", "")) for c in _code_cells(nb) for o in c.get("outputs", [])]
    assert any("16 GB T4" in text for text in printed)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_with_checked_numbers(nb):
    cells = _code_cells(nb)
    assert all(c["execution_count"] is not None for c in cells if "".join(c["source"]).strip())
    assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    checked = [c for c in cells if is_checked(c)]
    assert checked and all(c["outputs"] for c in checked)
    assert not any("NBVAL_" in "".join(c["source"]) for c in cells)  # checked by tag, not by a comment readers see
    assert max(len("".join(c["source"]).splitlines()) for c in cells) <= 40


MAX_STDERR_LINES = 40  # a few progress-bar states per training loop; every redraw would add one


def stderr_lines(cells) -> list[str]:
    """The lines a reader sees in a notebook's stderr blocks (a progress-bar redraw, ``\\r``, is a line too)."""
    import re

    text = "".join("".join(o["text"]) for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_shows_no_wall_of_progress_bars_or_warnings(nb):
    lines = stderr_lines(_code_cells(nb))
    assert len(lines) <= MAX_STDERR_LINES, f"{len(lines)} stderr lines, e.g. {lines[:3]}"
    warnings = [line for line in lines if "Warning" in line]
    assert not warnings, f"a warning in the committed output: {warnings[0][:200]}"


def test_stderr_lines_count_redraws():
    cells = [{"outputs": [{"name": "stderr", "text": ["\rbar 0%", "\rbar 50%\rbar 100%\n"]},
                          {"name": "stdout", "text": ["ignored\n"]}]}]
    assert stderr_lines(cells) == ["bar 0%", "bar 50%", "bar 100%"]


def test_checked_cells_pass_inside_their_bands_only():
    from nbformat import v4
    from nbval_tolerance import out_of_band, snap_to_reference

    ref = "RD4AD   0.90  0.91 mean 0.923\nOoD AUROC 85.1, 4 items, verdict holds\n"
    bands = [0.03, 0.03, 0.011, 2.5, 0]
    assert out_of_band(ref, ref.replace("0.923", "0.916").replace("85.1", "83.0"), bands) is None  # drift
    assert out_of_band(ref, ref.replace("0.923", "0.880"), bands) == ["number 3: 0.880 (committed 0.923, band ± 0.011)"]
    assert out_of_band(ref, ref.replace("4 items", "5 items"), bands)  # a band of 0: exact
    assert out_of_band(ref, ref.replace("holds", "inconclusive"), bands) == []  # verdicts and words: exact
    assert out_of_band(ref, ref + "extra line 0.1\n", bands) == []
    assert out_of_band(ref, ref.replace("0.90  0.91", "0.90 -0.01"), [0.03, 1, 0.011, 2.5, 0]) is None  # column widths
    assert out_of_band(ref, ref, bands[:-1]) == []  # bands that no longer fit the output
    test = [v4.new_output("stream", name="stdout", text=ref.replace("0.923", "0.930")),
            v4.new_output("execute_result", data={"text/plain": "AUROC 0.5"}, execution_count=1)]
    refs = [v4.new_output("stream", name="stdout", text=ref),
            v4.new_output("execute_result", data={"text/plain": "AUROC 0.9"}, execution_count=1)]
    snapped, problems = snap_to_reference(test, refs, {"stdout": bands, "text/plain:0": [0.1]})
    assert snapped[0]["text"] == ref and snapped[1]["data"]["text/plain"] == "AUROC 0.5"  # only the close one
    assert problems == ["text/plain:0 number 1: 0.5 (committed 0.9, band ± 0.1)"]
    assert test[0]["text"] != ref  # the test outputs themselves are not modified


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_checked_cell_has_bands_that_fit_its_output(nb):
    """Bands are measured by tests/bands.py; a checked cell changed since then must be measured again."""
    from nbval_tolerance import VERDICT, _texts, cell_bands, cell_open_verdicts, coalesce, numbers

    for c in _code_cells(nb):
        if not is_checked(c):
            continue
        bands, texts = cell_bands(c), _texts(coalesce(c["outputs"]))
        where = f"{nb.name} cell {c.get('id')}: "
        assert bands, where + "no bands: run tests/bands.py"
        for key, tol in bands.items():
            assert key in texts and len(tol) == len(numbers(texts[key][1])), where + f"{key} bands do not fit"
            assert all(t >= 0 for t in tol)
        for key, lines in cell_open_verdicts(c).items():  # each names a line whose committed verdict it allows
            printed = texts[key][1].split("\n")
            for i, allowed in lines.items():
                assert VERDICT.findall(printed[int(i)])[:1] in [[v] for v in allowed], where + f"{key} line {i}"


def test_a_wrong_chapter_parameter_stops_at_once_listing_the_valid_values(tmp_path):
    """MDD-Net's benchmark is checked before any data is read (it raised KeyError: 'foo' deep in the chapter)."""
    import time

    t = time.perf_counter()
    with pytest.raises(papermill.PapermillExecutionError, match="benchmark must be one of mvtec, visa, uni-medical"):
        papermill.execute_notebook(str(ROOT / "book" / "mdd_net.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"benchmark": "foo"}, cwd=str(ROOT / "book"), kernel_name="python3",
                                   progress_bar=False)
    assert time.perf_counter() - t < 120


def test_nbval_checks_a_tagged_cell_and_only_that(tmp_path):
    """The tag, not a comment in the code, makes nbval --nbval-lax compare a cell's output."""
    import subprocess
    import sys

    import nbformat
    from nbformat import v4

    def run(printed_by_checked: str) -> int:
        checked = v4.new_code_cell("print(1 + 1)", metadata={"tags": ["nbval-check-output"]}, execution_count=1,
                                   outputs=[v4.new_output("stream", name="stdout", text=printed_by_checked)])
        free = v4.new_code_cell("print(3)", execution_count=2, outputs=[v4.new_output("stream", name="stdout", text="not 3\n")])
        path = tmp_path / "t.ipynb"
        nbformat.write(v4.new_notebook(cells=[checked, free]), path)
        return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                                "--nbval-lax", "--nbval-current-env", "--rootdir", str(tmp_path), str(path)],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert run("2\n") == 0  # the untagged cell's wrong output is not compared
    assert run("5\n") != 0


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_and_colab_badge_use_the_repository_of_the_book_config(nb):
    """_config.yml's repository is the one place that names the repository: the Colab install cell installs
    uadkit from it and the badge at the top opens this very notebook from it."""
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    url, branch = repo["url"].rstrip("/"), repo["branch"]
    cells = json.loads(nb.read_text())["cells"]
    assert f'"uadkit @ git+{url}"' in "".join(_code_cells(nb)[0]["source"])
    top = "".join(cells[0]["source"])
    slug = url.split("github.com/", 1)[1]
    assert f"(https://colab.research.google.com/github/{slug}/blob/{branch}/book/{nb.name})" in top
    assert "colab-badge.svg" in top and "GPU runtime" in top


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_fits_the_page_and_bookkeeping_is_hidden(nb):
    """Code cells wrap at 100 columns (the book's column shows about that many); the cells that only record
    results or repeat the claims table's verdicts for the checks are removed from the rendered page."""
    cells = _code_cells(nb)
    long = [(c["id"], line[:60]) for c in cells for line in "".join(c["source"]).split("\n") if len(line) > 100]
    assert not long, f"lines over 100 columns: {long}"
    import re

    small = [(c["id"], m) for c in cells for m in re.findall(r"fontsize=(\d+)", "".join(c["source"])) if int(m) < 10]
    assert not small, f"a figure font under 10 pt reads under 9 pt in the book's column: {small}"
    for c in cells:
        src, tags = "".join(c["source"]), c["metadata"].get("tags", [])
        if "repro.record(" in src or src.strip() == 'print(claims_table["verdict"].to_string())':
            assert "remove-cell" in tags, f"cell {c['id']} is bookkeeping: tag it remove-cell"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_captioned_figures_have_alt_text_and_fit_the_column(nb):
    """A cell captioned through its metadata (a numbered figure in the book) shows images and nothing else rich
    (the caption would wrap each), one if the figure is named, says what it shows for a screen reader; every
    cell that draws is captioned; and every committed
    figure is at most 820 px wide (8.2 in at 100 dpi), so the book shows it at its own size, fonts unshrunk."""
    import base64
    import struct

    for c in _code_cells(nb):
        images = [o for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        for o in images:
            width = struct.unpack(">I", base64.b64decode(o["data"]["image/png"])[16:20])[0]
            assert width <= 820, f"cell {c['id']}: a figure {width} px wide is shrunk in the book"
        meta = c["metadata"].get("mystnb", {})
        if "figure" in meta:
            rich = [o for o in c.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")]
            # every rich output becomes a figure with this caption: images only, and one at most if it is named
            # (a label can point to one figure only)
            assert len(rich) == len(images), f"cell {c['id']}: a captioned cell shows a rich output that is no image"
            assert len(images) <= 1 or "name" not in meta["figure"], f"cell {c['id']}: a named figure, {len(images)} images"
            assert meta["figure"].get("caption") and meta.get("image", {}).get("alt"), f"cell {c['id']}: caption and alt"
        elif images:
            raise AssertionError(f"cell {c['id']} draws a figure without a caption (cell metadata mystnb.figure)")
