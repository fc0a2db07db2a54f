"""The checked cells' bands let drift through and stop a regression.

The ADTR chapter's main table has one row per category, the mean over three training seeds; its
mini/brick row is reproduced here by the chapter's own steps (ADTR trained on mini/brick with seeds
0, 1, 2, the three runs' metrics averaged), once with another kernel set
(``ATEN_CPU_CAPABILITY=default``: unvectorised kernels, other rounding, the closest stand-in for
another CPU on one machine) and once with a deliberately broken model. The first must lie inside
the bands committed with the chapter, the second (a training loop that stops after one epoch) outside them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

from nbval_tolerance import NUMBER, cell_bands, coalesce, out_of_band

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import numpy as np
import uadkit.models
from uadkit import metrics, profiles
from uadkit.data import get_dataset, stack
from uadkit.train import seed_everything

broken = sys.argv[1]
P = profiles.get("smoke")
seed_everything(0)
overrides = {"epochs": 1, "lr_drop_epoch": 1} if broken == "one epoch" else {}
train, test = (get_dataset("mini/brick", s, image_size=P.image_size) for s in ("train", "test"))
masks = stack(test, "mask")
rows = []
for seed in P.seeds(0, 3):  # the chapter's seeds 0, 1, 2
    det = uadkit.models.create("adtr", profile=P.name, device=P.device, seed=seed, progress=False, **overrides)
    scores, maps = det.fit(train).predict(test)
    rows.append([metrics.image_auroc(scores, test.labels), metrics.pixel_auroc(maps, masks), metrics.aupro(maps, masks)])
print(json.dumps(np.mean(rows, axis=0).tolist()))
"""


def _committed_row():
    nb = nbformat.read(ROOT / "book" / "adtr.ipynb", 4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "ours = sum(per_seed.values())" in c.source)
    # the table is displayed (viz.show_table): its text form is the cell's first rich output
    text = next(o["data"]["text/plain"] for o in coalesce(cell.outputs) if "text/plain" in o.get("data", {}))
    bands = cell_bands(cell)["text/plain:0"]
    # the numbers of the mini/brick line and their bands
    before = text[:text.index("mini/brick")]
    first = len(NUMBER.findall(before))
    line = text[text.index("mini/brick"):].splitlines()[0]
    return line, bands[first:first + len(NUMBER.findall(line))]


def _reproduce(broken: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, broken], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env}, cwd=ROOT / "book")
    assert out.returncode == 0, out.stderr[-2000:]
    values = json.loads(out.stdout.strip().splitlines()[-1])
    line, _ = _committed_row()  # the committed line with this run's numbers in place of its own
    printed = iter(f"{v:.2f}" for v in values)
    return NUMBER.sub(lambda m: next(printed), line)


def test_bands_pass_the_drift_of_another_kernel_set_and_stop_a_broken_model():
    line, bands = _committed_row()
    assert len(bands) == 3 and all(b > 0 for b in bands)
    drifted = _reproduce("no", ATEN_CPU_CAPABILITY="default")
    assert out_of_band(line, drifted, bands) is None, f"drift outside the bands: {drifted!r} vs {line!r} ± {bands}"
    broken = _reproduce("one epoch")  # training loops that stop after their first epoch
    assert out_of_band(line, broken, bands), f"a broken model passed: {broken!r} inside {line!r} ± {bands}"


def test_a_verdict_other_seeds_changed_accepts_only_the_verdicts_they_printed():
    from bands import open_verdict_lines

    committed = "claim\nA beats B    holds\nA beats kNN  contradicted\n"
    other_seeds = ["claim\nA beats B    inconclusive\nA beats kNN  contradicted\n"]
    opened = open_verdict_lines(committed, other_seeds)
    assert opened == {"1": ["holds", "inconclusive"]}
    assert out_of_band(committed, other_seeds[0], [], opened) is None
    assert out_of_band(committed, committed.replace("holds", "contradicted"), [], opened) == []  # never printed
    assert out_of_band(committed, committed.replace("contradicted", "inconclusive"), [], opened) == []  # a stable line
    assert out_of_band(committed, other_seeds[0], []) == []  # without the measured lines every verdict is exact


def test_a_displayed_table_is_checked_through_its_text_and_its_html_follows():
    """A DataFrame shown with display() is compared by its text/plain within the bands; its HTML (the
    book's table) then counts as the committed one, and a number outside its band still fails."""
    import pandas as pd

    from nbval_tolerance import snap_to_reference

    def shown(value):
        df = pd.DataFrame({"image AUROC": [value]}, index=["mini/brick"])
        return [{"output_type": "display_data", "metadata": {},
                 "data": {"text/plain": repr(df), "text/html": df.to_html()}}]

    committed, drift, broken = shown(0.96), shown(0.95), shown(0.80)
    snapped, problems = snap_to_reference(drift, committed, {"text/plain:0": [0.03]})
    assert problems == [] and snapped[0]["data"] == committed[0]["data"]
    snapped, problems = snap_to_reference(broken, committed, {"text/plain:0": [0.03]})
    assert problems and snapped[0]["data"]["text/html"] != committed[0]["data"]["text/html"]
