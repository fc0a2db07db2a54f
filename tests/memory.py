"""Peak memory of a detector's ``fit``, measured in a fresh process (shared by the methods' tests).

``fit_peaks_mb(method, sizes, tmp_path, ...)`` writes, for each ``n_train`` in ``sizes``, that many small PNGs as an MVTec-style
``train/good`` tree, loads it at ``image_size`` with the real folder loader, and fits
``uadkit.models.create(method, profile="paper", ...)`` on it in a child process (the children side by side), in the dry run
(at most 2 optimiser steps per training, random weights where none are cached), so that the
time does not grow with the data while any memory kept per image still does. Returns each
child's peak resident memory in MB (``ru_maxrss``), with glibc's malloc set to hand large freed
blocks back at once, so that the peak is that of the memory actually held (repeatable to a few MB).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

_CHILD = r"""
import json, resource, sys
import torch
import uadkit.models
from uadkit.data import get_dataset
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
train = get_dataset("folder/" + args["tree"], "train", image_size=args["image_size"])
det = uadkit.models.create(args["method"], profile="paper", device="cpu", batch_size=args["batch_size"],
                           progress=False, **args["overrides"])
det.fit(train)
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_tree(root: Path, n: int, *, seed: int = 0, size: int = 32, categories: int = 1) -> Path:
    """An MVTec-style tree with ``n`` normal training images (and a tiny test split)."""
    rng = np.random.default_rng(seed)
    for split, sub, count in (("train", "good", n), ("test", "good", 2)):
        folder = root / split / sub
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return root


def fit_peaks_mb(method: str, sizes: tuple[int, ...], tmp_path: Path, *, image_size: int = 256, batch_size: int = 8,
                 mmap_threshold: int = 1 << 20, timeout: int = 600, **overrides) -> list[float]:
    """Peak memory (MB) of one fit per training-set size in ``sizes``, each in its own child process; the
    children run side by side (one thread each: on two cores the pair takes the time of one fit). Peak
    resident memory is per process, so running them together does not change what each one measures.
    ``mmap_threshold``: glibc's ``MALLOC_MMAP_THRESHOLD_`` in the children (see below)."""
    # one thread, and the machine's own kernels (a capped ISA runs bf16 through slow reference kernels)
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env |= {"UADKIT_DRY_RUN": "1", "UADKIT_WEIGHTS": str(tmp_path / "no-weights"), "OMP_NUM_THREADS": "1",
            "UADKIT_THREADS": "1", "UADKIT_CPU_PINS": "0",
            "UADKIT_DRY_RUN_AMP": "0",  # float32: bf16 on a CPU without bf16 instructions is 45x slower
            # glibc maps every block of 1 MB or more on its own and unmaps it when freed: with its adaptive threshold
            # the peak of one and the same ADTR fit varied by 100-160 MB from run to run (1370-1538 MB, measured),
            # now by under 10 MB (1240-1251 MB); the fits take ~60 % longer (page faults)
            # (QFAE's fit still varied by ~55 MB at 1 MB, e.g. 1605 or 1660 MB for one and the same fit; at 64 kB by 1 MB)
            "MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    children = []
    for n_train in sizes:
        tree = make_tree(tmp_path / f"tree{n_train}", n_train)
        args = json.dumps({"tree": str(tree), "method": method, "image_size": image_size, "batch_size": batch_size,
                           "overrides": overrides})
        children.append(subprocess.Popen([sys.executable, "-c", _CHILD, args], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    peaks = []
    try:
        for n_train, child in zip(sizes, children):
            out, err = child.communicate(timeout=timeout)
            if child.returncode != 0:
                raise RuntimeError(f"fit of {method} on {n_train} images failed:\n{err[-3000:]}")
            kb = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_KB"))
            peaks.append(kb / 1024)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return peaks
