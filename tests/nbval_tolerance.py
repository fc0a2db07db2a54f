"""Let nbval's checked cells tolerate last-digit drift in printed decimals.

A chapter trains small models on the CPU. Two machines with different CPUs run the same
code with the same seeds, yet their floating-point sums differ in the last bits, and after
a few hundred optimiser steps an AUROC printed as 0.97 on one machine can be 0.96 on the
other. The checked cells (``# NBVAL_CHECK_OUTPUT``) should catch a real regression, not
such drift. So a new output counts as equal to the committed one when

* everything but the numbers is identical (words, layout, column names),
* every integer is identical (shapes, counts, epochs),
* every decimal is within ``TOLERANCE · max(1, |committed|)`` of the committed value
  (0.02 on an AUROC in [0, 1], 1.7 on a percentage of 85).

Anything else is compared by nbval as before, character by character.
"""
from __future__ import annotations

import copy
import re

TOLERANCE = 0.02
_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)")


def numbers_close(reference: str, new: str, tolerance: float = TOLERANCE) -> bool:
    """True if ``new`` differs from ``reference`` only by decimals within the tolerance."""
    ref_parts, new_parts = _NUMBER.split(reference), _NUMBER.split(new)
    if len(ref_parts) != len(new_parts):
        return False
    for k, (r, n) in enumerate(zip(ref_parts, new_parts)):
        if k % 2 == 0 or r == n:  # text between numbers, or an identical number
            if r != n:
                return False
            continue
        if "." not in r or "." not in n:  # integers must match exactly
            return False
        if abs(float(r) - float(n)) > tolerance * max(1.0, abs(float(r))):
            return False
    return True


def snap_to_reference(test: list, ref: list) -> list:
    """A copy of the test outputs where every stream text that is ``numbers_close`` to the
    reference stream of the same name (in order) is replaced by the reference text."""
    test = copy.deepcopy(test)
    refs = {}
    for out in ref:
        if out.get("output_type") == "stream":
            refs.setdefault(out["name"], []).append(out["text"])
    seen: dict[str, int] = {}
    for out in test:
        if out.get("output_type") != "stream":
            continue
        k = seen.get(out["name"], 0)
        seen[out["name"]] = k + 1
        candidates = refs.get(out["name"], [])
        if k < len(candidates) and numbers_close(candidates[k], out["text"]):
            out["text"] = candidates[k]
    return test


def install() -> None:
    """Wrap nbval's output comparison (a no-op when nbval is not installed)."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:
        return
    if getattr(IPyNbCell.compare_outputs, "_tolerant", False):
        return
    original = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, *args, **kwargs):
        return original(self, snap_to_reference(test, ref), ref, *args, **kwargs)

    compare_outputs._tolerant = True
    IPyNbCell.compare_outputs = compare_outputs
