"""Checked notebook cells compared within bands measured for each of their numbers.

A chapter trains small models on the CPU. Another seed, another CPU or another kernel set
(``ATEN_CPU_CAPABILITY=default``) gives other digits: float sums round differently, and after a
few hundred optimiser steps an AUROC printed as 0.97 can come out as 0.95. A checked cell
(cell tag ``nbval-check-output``) should fail on a regression, not on such drift, so each checked cell
carries in its metadata the band of every number it prints, measured by ``tests/bands.py``::

    cell.metadata["uadkit"]["bands"] = {"stdout": [0.0, 0.031, 0.012, ...], "text/plain:0": [...]}

one tolerance per number of that output, in order: about three standard deviations of the
number over seeds (0 for what does not move: counts, shapes, settings), plus one unit of its
last printed digit for rounding. A new output counts as equal to the committed one when

* everything but the numbers is identical (words, verdicts, lines, column names; a run of
  spaces counts as one, since a column widens when one of its numbers gains a minus sign), and
* every number lies within its band of the committed value.

A claims table's verdict (holds / contradicted / inconclusive) must match too, with one exception
measured like the bands: where the runs with other seeds (or the same seeds on another kernel set)
already printed another verdict on a line, that line may print any verdict seen there, and only those::

    cell.metadata["uadkit"]["open_verdicts"] = {"stdout": {"3": ["holds", "inconclusive"]}}

(line 3, counted from 0, printed "holds" in one run and "inconclusive" in another). Such a verdict
depends on the seeds drawn or on rounding, and a chaotic training on another CPU is as good as another
draw; no check can hold it on every machine. Every other verdict is compared exactly.

A displayed table (a DataFrame) is checked through its ``text/plain`` form, as ``"text/plain:<i>"``; its HTML,
which the book shows, counts as the committed one when the text does.

A checked cell without bands, or whose bands no longer fit its output (another count of
numbers), is compared by nbval character by character; ``tests/test_book.py`` fails on such cells.
"""
from __future__ import annotations

import copy
import re

# A number stands alone: the digits of "RD4AD", "ResNet50" or "2a" are part of words.
NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?!\w)")


def layout(part: str) -> str:
    """Text between numbers as compared: runs of spaces count as one (a table's column widens when
    one of its numbers gains a minus sign)."""
    return re.sub(r"[ \t]+", " ", part)


CHECK_TAG = "nbval-check-output"  # nbval --nbval-lax compares the outputs of the cells with this tag


def is_checked(cell) -> bool:
    """Whether nbval compares this cell's outputs with the committed ones (within its bands)."""
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


VERDICT = re.compile(r"\b(holds|contradicted|inconclusive)\b")


def open_verdict(text: str, lines: dict[str, list[str]]) -> str:
    """``text`` with the verdict of each line listed in ``lines`` (see the module's docstring) replaced by
    a placeholder naming the verdicts allowed there, so that any of them compares equal."""
    if not lines:
        return text
    out = text.split("\n")
    for i, allowed in lines.items():
        i = int(i)
        if i < len(out):
            out[i] = VERDICT.sub(lambda m: f"<{'|'.join(sorted(allowed))}>" if m.group(1) in allowed else m.group(1),
                                 out[i])
    return "\n".join(out)


def numbers(text: str) -> list[str]:
    """The numbers of ``text`` as printed, in order."""
    return NUMBER.findall(text)


def out_of_band(reference: str, new: str, bands: list[float], open_lines: dict | None = None) -> list[str] | None:
    """``None`` if ``new`` differs from ``reference`` only by numbers inside ``bands`` (and by verdicts
    allowed on ``open_lines``); else a list of what differs (empty if the layout itself differs)."""
    reference, new = open_verdict(reference, open_lines or {}), open_verdict(new, open_lines or {})
    ref_parts, new_parts = NUMBER.split(reference), NUMBER.split(new)
    if len(ref_parts) != len(new_parts) or len(bands) != len(ref_parts) // 2:
        return []
    problems = []
    for k, (r, n) in enumerate(zip(ref_parts, new_parts)):
        if k % 2 == 0:  # the text between numbers must be identical
            if layout(r) != layout(n):
                return []
            continue
        tol = bands[k // 2]
        if abs(float(r) - float(n)) > tol + 1e-9:
            problems.append(f"number {k // 2 + 1}: {n} (committed {r}, band ± {tol:g})")
    return problems or None


def coalesce(outputs: list) -> list:
    """A copy of ``outputs`` with each stream's pieces joined into one (as nbval compares them)."""
    merged, streams = [], {}
    for out in copy.deepcopy(list(outputs)):
        if out.get("output_type") == "stream":
            text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
            if out["name"] in streams:
                streams[out["name"]]["text"] += text
                continue
            out["text"] = text
            streams[out["name"]] = out
        elif "data" in out and isinstance(out["data"].get("text/plain"), list):
            out["data"]["text/plain"] = "".join(out["data"]["text/plain"])
        merged.append(out)
    return merged


def _texts(outputs: list) -> dict[str, tuple[dict, str]]:
    """Each comparable text of a (coalesced) output list: ``"stdout"``/``"stderr"`` streams and
    ``"text/plain:<i>"`` for the i-th rich output, mapped to (its output node, its text)."""
    texts, rich = {}, 0
    for out in outputs:
        if out.get("output_type") == "stream":
            texts[out["name"]] = (out, out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            texts[f"text/plain:{rich}"] = (out, out["data"]["text/plain"])
            rich += 1
    return texts


def snap_to_reference(test: list, ref: list, bands: dict[str, list[float]],
                      open_verdicts: dict | None = None) -> tuple[list, list[str]]:
    """A copy of ``test`` in which every text within its bands of the reference is replaced by the
    reference text (so nbval finds it equal), and the list of numbers found out of band."""
    test = copy.deepcopy(test)
    new_texts, ref_texts = _texts(test), _texts(ref)
    problems = []
    for key, tol in bands.items():
        if key not in new_texts or key not in ref_texts:
            continue
        (node, new), (ref_node, old) = new_texts[key], ref_texts[key]
        found = out_of_band(old, new, tol, (open_verdicts or {}).get(key))
        if found is None:
            if key.startswith("text/plain"):
                # a displayed DataFrame: its HTML (what the book shows) holds the same numbers as its
                # text/plain, which is what the bands check; within them, both count as the committed ones
                for mime in ("text/plain", "text/html"):
                    if mime in ref_node["data"] and mime in node["data"]:
                        node["data"][mime] = ref_node["data"][mime]
            else:
                node["text"] = old
        else:
            problems += [f"{key} {p}" for p in found] or [f"{key}: the layout differs from the committed output"]
    return test, problems


def cell_bands(cell) -> dict[str, list[float]]:
    return dict(cell.get("metadata", {}).get("uadkit", {}).get("bands", {}))


def cell_open_verdicts(cell) -> dict[str, dict[str, list[str]]]:
    return dict(cell.get("metadata", {}).get("uadkit", {}).get("open_verdicts", {}))


def install() -> None:
    """Wrap nbval's output comparison (a no-op when nbval is not installed)."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:
        return
    if getattr(IPyNbCell.compare_outputs, "_banded", False):
        return
    original = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, *args, **kwargs):
        bands = cell_bands(self.cell)
        if not bands:
            return original(self, test, ref, *args, **kwargs)
        snapped, problems = snap_to_reference(test, ref, bands, cell_open_verdicts(self.cell))
        ok = original(self, snapped, ref, *args, **kwargs)
        if not ok and problems:
            self.comparison_traceback.append("numbers outside their measured bands (tests/bands.py):")
            self.comparison_traceback += [f"  {p}" for p in problems]
        return ok

    compare_outputs._banded = True
    IPyNbCell.compare_outputs = compare_outputs
