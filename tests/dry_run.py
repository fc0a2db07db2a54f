"""Execute chapters in the paper profile's dry run and fail on any error (``make dry-run``).

    python tests/dry_run.py [book/adtr.ipynb ...]    # default: every chapter

Each chapter runs with papermill, ``-p profile paper -p dry_run True``, into a temporary folder
(``$DRY_RUN_OUT``, default ``$TMPDIR/uadkit-dry-run``); the committed notebooks are not touched.
``$UADKIT_JOBS`` chapters (default 2) run side by side, each on ``$UADKIT_THREADS`` torch threads
(default 1). Prints each chapter's wall time, the error of a failed one, and exits non-zero if any failed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the longest first, so that chapters run side by side finish close together (measured dry-run times)
LONGEST_FIRST = ["qfae", "memmc_mae", "mdd_net", "adtr", "anomem", "baseline"]


def _order(path: Path) -> int:
    return LONGEST_FIRST.index(path.stem) if path.stem in LONGEST_FIRST else -1


def run_one(nb: Path, out: Path, env: dict) -> tuple[bool, float]:
    """One chapter with papermill in its own process, its output in ``out/<chapter>.log``: (passed, seconds)."""
    print(f"dry run: {nb.name} ...", flush=True)
    t0 = time.perf_counter()
    log = out / f"{nb.stem}.log"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "papermill", "-k", "python3", "--cwd", str(ROOT / "book"),
                              str(nb), str(out / nb.name), "-p", "profile", "paper", "-p", "dry_run", "True",
                              "--no-progress-bar", "--log-level", "WARNING"], env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if rc:  # papermill's error names the cell and holds the traceback
        print(f"FAILED {nb.name}:\n{log.read_text()[-6000:]}", flush=True)
    print(f"dry run: {nb.name} {'failed' if rc else 'passed'} in {seconds:.0f} s", flush=True)
    return rc == 0, seconds


def main(notebooks: list[str]) -> int:
    out = Path(os.environ.get("DRY_RUN_OUT") or Path(tempfile.gettempdir()) / "uadkit-dry-run")
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted([Path(n) for n in notebooks] or (ROOT / "book").glob("*.ipynb"), key=_order)
    jobs = int(os.environ.get("UADKIT_JOBS", "2"))
    env = {**os.environ, "PYTHONHASHSEED": "0", "TQDM_MININTERVAL": "30"}
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("UADKIT_THREADS", "1")
    env.setdefault("UADKIT_CPU_PINS", "0")  # no kernel caps: bf16 at full speed (uadkit.train.pin_cpu)
    # checkpoints and executed notebooks go to the temporary folder: a full disk there fails a chapter
    print(f"free disk under {tempfile.gettempdir()}: {shutil.disk_usage(tempfile.gettempdir()).free / 2**30:.1f} GB",
          flush=True)
    t_all = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:  # threads only wait: each chapter runs in its own process
        results = dict(zip((nb.name for nb in paths), pool.map(lambda nb: run_one(nb, out, env), paths)))
    failed = [name for name, (ok, _) in results.items() if not ok]
    print(f"\nchapter dry runs (paper profile, fake data; {jobs} at a time):")
    for name, (ok, seconds) in results.items():
        print(f"  {name:<20} {seconds:6.0f} s  {'ok' if ok else 'FAILED'}")
    print(f"  {'wall time':<20} {time.perf_counter() - t_all:6.0f} s")
    print(f"executed notebooks and their logs in {out}")
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
