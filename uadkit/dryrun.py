"""The paper profile's dry run: every cell of a chapter on the paper's code path, in minutes.

The idea is Lightning's ``fast_dev_run``. A chapter run with ::

    papermill book/adtr.ipynb out.ipynb -p profile paper -p dry_run True

takes the paper profile as it is (the paper's architectures, widths, input sizes,
dataset loaders and folder layouts, AMP) and changes only how much work it does:

* data: small fake trees in the published layouts (:mod:`uadkit.data.fake`), built
  once under ``$UADKIT_DRY_RUN_DATA`` (default: a folder in the uadkit cache) and
  read through ``$UADKIT_DATA`` by the real loaders;
* tables: at most :data:`MAX_ITEMS` categories, classes or sweep values each
  (:func:`head`);
* training: :func:`uadkit.train.fit` runs 1 epoch of at most :data:`MAX_STEPS`
  optimiser steps; hand-written loops call :func:`steps` for their own count;
* weights: a backbone whose pretrained file is not cached is built at random
  initialisation, and says so (never outside a dry run);
* AMP: bfloat16 autocast also on a CPU with bf16 instructions (AVX512-BF16 or AMX), so the
  mixed-precision path that CUDA takes is executed here; on a CPU without them bf16 convolutions
  run 45 times slower than float32, and the dry run stays in float32 (:func:`cpu_amp`; each
  method's unit tests still run a training step under CPU autocast, at toy sizes).

Nothing it produces is a result: every number of a dry run is noise.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence, TypeVar

__all__ = ["enable", "disable", "active", "head", "epochs", "steps", "MAX_STEPS", "MAX_ITEMS", "note",
           "cpu_amp"]

MAX_STEPS = 2  # optimiser steps per training
MAX_ITEMS = 2  # categories (or classes, or sweep values) per table

_state: dict = {"active": False, "root": None, "said": set()}

T = TypeVar("T")


def active() -> bool:
    """True inside a dry run (after :func:`enable`, or with ``UADKIT_DRY_RUN=1`` in the environment)."""
    return _state["active"] or os.environ.get("UADKIT_DRY_RUN", "") == "1"


def cpu_amp() -> bool:
    """Whether a dry run autocasts to bf16 on the CPU: ``$UADKIT_DRY_RUN_AMP`` (1 or 0) if set, else whether
    the CPU has native bf16 instructions (``avx512_bf16`` or ``amx_bf16`` among /proc/cpuinfo's flags).
    Without them oneDNN runs bf16 convolutions through reference kernels: a 256-channel 3×3 convolution
    on 8×16×16 took 2.76 s against 0.06 s in float32 (one thread, AMD EPYC with AVX2 only), so a
    paper-size dry run would take hours."""
    forced = os.environ.get("UADKIT_DRY_RUN_AMP", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell cheaply, so the safe (fast) choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def note(message: str) -> None:
    """Print ``message`` once per process, prefixed so that a reader of the output sees it is a dry run."""
    if message not in _state["said"]:
        _state["said"].add(message)
        print(f"[dry run] {message}", flush=True)


def enable(root: str | os.PathLike | None = None) -> Path:
    """Switch the dry run on for this process: build the fake trees and point ``$UADKIT_DATA`` at them.

    ``root`` (default ``$UADKIT_DRY_RUN_DATA``, else ``<uadkit cache>/dry-run-data``) holds the
    trees; they are built once and reused. Returns that folder.
    """
    from .data import fake
    from .data.base import cache_dir

    root = Path(root or os.environ.get("UADKIT_DRY_RUN_DATA") or cache_dir() / "dry-run-data").expanduser()
    fake.build_all(root)
    os.environ["UADKIT_DATA"] = str(root)
    # a fresh results folder per dry run: its noise never mixes with real results, and no run is skipped
    # (deleted when the process ends: a dry run's checkpoints of paper-size models take gigabytes)
    results = tempfile.mkdtemp(prefix="uadkit-dry-run-results-")
    atexit.register(shutil.rmtree, results, ignore_errors=True)
    os.environ["UADKIT_RESULTS"] = results
    os.environ["UADKIT_DRY_RUN"] = "1"  # child processes (data loader workers) see it too
    _state.update(active=True, root=root)
    note(f"fake datasets in the published layouts under {root}; {MAX_ITEMS} categories per table, "
         f"1 epoch of at most {MAX_STEPS} steps per training, "
         f"{'bf16 autocast' if cpu_amp() else 'float32 on the CPU (no native bf16 here; bf16 autocast on CUDA)'}; "
         "no number here is a result")
    return root


def disable() -> None:
    """Switch the dry run off again (tests use this)."""
    _state.update(active=False, root=None)
    _state["said"].clear()
    if os.environ.get("UADKIT_DRY_RUN") == "1":
        del os.environ["UADKIT_DRY_RUN"]


def head(items: Sequence[T], n: int = MAX_ITEMS) -> Sequence[T]:
    """``items`` as they are, or their first ``n`` in a dry run (same type for tuples and lists)."""
    if not active():
        return items
    if isinstance(items, dict):
        return dict(list(items.items())[:n])  # type: ignore[return-value]
    return items[:n]


def epochs(n: int) -> int:
    """The number of epochs to run: ``n``, or 1 in a dry run."""
    return min(n, 1) if active() else n


def steps(n: int) -> int:
    """The number of optimiser steps to run: ``n``, or at most :data:`MAX_STEPS` in a dry run."""
    return min(n, MAX_STEPS) if active() else n
