"""Measure, write and check the bands of the chapters' checked cells (see nbval_tolerance.py).

The committed notebooks are executed with seed 0 (a chapter trains each compared model with seeds
0, 1, 2). Execute them again with other seeds, 3 and 6 so that no run shares a seed (and, to test
the bands, with another kernel set), then derive every checked number's band from its spread over
the runs and write it into the committed notebook's cell metadata::

    python tests/bands.py execute /tmp/runs/seed3 --seed 3
    python tests/bands.py execute /tmp/runs/seed6 --seed 6
    python tests/bands.py measure /tmp/runs/seed3 /tmp/runs/seed6      # writes book/*.ipynb metadata
    ATEN_CPU_CAPABILITY=default python tests/bands.py execute /tmp/runs/aten-default --seed 0
    python tests/bands.py check /tmp/runs/aten-default                 # every checked cell inside its bands?

A number's band is ``K`` standard deviations over the runs (the committed one included; for a
decimal, at least ``K`` times the root-mean-square spread of the decimals on its line, because
three runs estimate one number's spread poorly), plus one unit of its last printed digit. A
number that no run moved (a count, a setting, a shape) has a band of 0. Words are never banded: they
must match exactly. So must verdicts, except on a line where a run with other seeds printed another
verdict: that line then accepts the verdicts the runs printed, and ``measure`` lists it
(``open_verdicts`` in the cell's metadata; the chapter's prose says which claims those are).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbval_tolerance import (NUMBER, VERDICT, _texts, cell_bands, cell_open_verdicts, coalesce, is_checked,  # noqa: E402
                             layout, open_verdict, out_of_band)

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
K = 3.0


def checked_cells(nb) -> dict[str, dict]:
    return {c["id"]: c for c in nb.cells if c.cell_type == "code" and is_checked(c)}


def cells_by_id(nb) -> dict[str, dict]:
    return {c["id"]: c for c in nb.cells if c.cell_type == "code"}


def _comparable(outputs) -> dict[str, str]:
    """The texts of a cell's outputs that bands apply to (stdout and rich text; stderr holds progress bars)."""
    return {k: text for k, (_, text) in _texts(coalesce(outputs)).items() if k != "stderr"}


def _unit(token: str) -> float:
    return 10.0 ** -len(token.split(".")[1]) if "." in token else 1.0


def bands_for(reference: str, others: list[str]) -> tuple[list[float], int]:
    """The band of every number of ``reference`` from its spread over ``others`` (same layout only);
    returns the bands and how many of ``others`` had the same layout."""
    ref_parts = NUMBER.split(reference)
    same = [o for o in others if [layout(p) for p in NUMBER.split(o)[::2]] == [layout(p) for p in ref_parts[::2]]]
    tokens = ref_parts[1::2]
    values = np.array([[float(t) for t in NUMBER.split(text)[1::2]] for text in [reference, *same]])
    sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(tokens))
    decimal = np.array(["." in t for t in tokens])
    # the lines the numbers stand on, to pool the spread of a line's decimals
    line_of, line = [], 0
    for k, part in enumerate(ref_parts):
        if k % 2 == 0:
            line += part.count("\n")
        else:
            line_of.append(line)
    line_of = np.array(line_of)
    bands = []
    for i, token in enumerate(tokens):
        if sd[i] == 0 and not decimal[i]:
            bands.append(0.0)
            continue
        if decimal[i]:
            on_line = decimal & (line_of == line_of[i])
            pooled = math.sqrt(float(np.mean(sd[on_line] ** 2)))
            band = K * max(sd[i], pooled) + _unit(token)
            digits = len(token.split(".")[1]) + 1
            bands.append(round(band, digits))
        else:
            bands.append(float(math.ceil(K * sd[i])))
    return bands, len(same)


def open_verdict_lines(reference: str, others: list[str]) -> dict[str, list[str]]:
    """The lines of ``reference`` whose verdict another run (same number of lines) printed otherwise,
    each with every verdict printed there: ``{"3": ["holds", "inconclusive"]}``."""
    ref_lines, seen = reference.split("\n"), {}
    for other in others:
        lines = other.split("\n")
        if len(lines) != len(ref_lines):
            continue
        for i, (a, b) in enumerate(zip(ref_lines, lines)):
            va, vb = VERDICT.findall(a), VERDICT.findall(b)
            if len(va) == len(vb) == 1 and va != vb:
                seen.setdefault(str(i), {va[0]}).add(vb[0])
    return {i: sorted(v) for i, v in seen.items()}


def measure(run_dirs: list[Path], notebooks: list[Path]) -> int:
    for path in notebooks:
        runs = [nbformat.read(d / path.name, 4) for d in run_dirs if (d / path.name).is_file()]
        if not runs:
            print(f"{path.name}: no runs, skipped")
            continue
        nb = nbformat.read(path, 4)
        run_cells = [cells_by_id(r) for r in runs]  # a run's cell is found by its id, whatever it is tagged
        for cid, cell in checked_cells(nb).items():
            bands, opened, notes = {}, {}, []
            for key, ref_text in _comparable(cell.outputs).items():
                others = [_comparable(rc[cid].outputs).get(key) for rc in run_cells if cid in rc]
                others = [o for o in others if o is not None]
                lines = open_verdict_lines(ref_text, others)
                if lines:
                    opened[key] = lines
                    notes.append(f"{key}: verdicts that other seeds changed, lines {', '.join(lines)}")
                bands[key], n_same = bands_for(open_verdict(ref_text, lines), [open_verdict(o, lines) for o in others])
                if n_same < len(others):
                    notes.append(f"{key}: {len(others) - n_same} run(s) printed another layout, not used")
            cell.metadata.setdefault("uadkit", {})
            cell.metadata["uadkit"]["bands"] = bands
            if opened:
                cell.metadata["uadkit"]["open_verdicts"] = opened
            else:
                cell.metadata["uadkit"].pop("open_verdicts", None)
            cell.metadata["uadkit"]["bands_from"] = (
                f"{K:g} sd over the committed run and {len(runs)} run(s) with other seeds, + 1 unit of the last digit; "
                f"measured {time.strftime('%Y-%m-%d')} by tests/bands.py")
            widest = max((max(b) for b in bands.values() if b), default=0)
            print(f"{path.name} cell {cid}: {sum(map(len, bands.values()))} numbers, widest band ± {widest:g}"
                  + "".join(f"; {n}" for n in notes))
        nbformat.write(nb, path)
    return 0


def check(run_dir: Path, notebooks: list[Path]) -> int:
    failed = 0
    for path in notebooks:
        run_path = run_dir / path.name
        if not run_path.is_file():
            continue
        committed, run = checked_cells(nbformat.read(path, 4)), cells_by_id(nbformat.read(run_path, 4))
        for cid, cell in committed.items():
            bands, opened, ref = cell_bands(cell), cell_open_verdicts(cell), _comparable(cell.outputs)
            new = _comparable(run[cid].outputs) if cid in run else {}
            problems = []
            for key, text in ref.items():
                if key not in new:
                    problems.append(f"{key}: missing")
                    continue
                found = out_of_band(text, new[key], bands.get(key, [0.0] * len(NUMBER.findall(text))), opened.get(key))
                if found is not None:
                    problems += found or [f"{key}: another layout"]
            failed += bool(problems)
            print(f"{path.name} cell {cid}: " + ("inside its bands" if not problems else "OUT: " + "; ".join(problems)))
    print(f"{failed} checked cell(s) outside their bands")
    return 1 if failed else 0


def execute(out_dir: Path, seed: int, notebooks: list[Path]) -> int:
    """Each chapter executed with ``seed`` into ``out_dir`` (the environment's kernel settings apply)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "TQDM_MININTERVAL": "30",
           "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "UADKIT_RESULTS": str(out_dir / "results")}
    for path in notebooks:
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "papermill", "-k", "python3", "--cwd", str(BOOK), str(path),
                              str(out_dir / path.name), "-p", "seed", str(seed), "--log-level", "WARNING"], env=env)
        print(f"{path.name}: seed {seed}, rc {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            return rc
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("measure", "check", "execute"):
        p = sub.add_parser(name)
        p.add_argument("dirs", nargs="+" if name == "measure" else 1, type=Path)
        p.add_argument("--notebooks", nargs="*", type=Path, default=sorted(BOOK.glob("*.ipynb")))
        if name == "execute":
            p.add_argument("--seed", type=int, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        return measure(a.dirs, a.notebooks)
    if a.cmd == "check":
        return check(a.dirs[0], a.notebooks)
    return execute(a.dirs[0], a.seed, a.notebooks)


if __name__ == "__main__":
    sys.exit(main())
