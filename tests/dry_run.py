"""Execute chapters in the paper profile's dry run and fail on any error (``make dry-run``).

    python tests/dry_run.py [book/adtr.ipynb ...]    # default: every chapter

Each chapter runs with papermill, ``-p profile paper -p dry_run True``, into a temporary folder
(``$DRY_RUN_OUT``, default ``$TMPDIR/uadkit-dry-run``); the committed notebooks are not touched.
``$UADKIT_JOBS`` chapters (default 2) run side by side, each on ``$UADKIT_THREADS`` torch threads
(default 1). Prints each chapter's wall time, the error of a failed one, and exits non-zero if any failed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the longest first, so that two at a time finish close together (seconds measured one at a time, 2 threads)
LONGEST_FIRST = ["qfae", "mdd_net", "memmc_mae", "adtr", "anomem", "baseline"]


def _order(path: Path) -> int:
    return LONGEST_FIRST.index(path.stem) if path.stem in LONGEST_FIRST else -1


def main(notebooks: list[str]) -> int:
    out = Path(os.environ.get("DRY_RUN_OUT") or Path(tempfile.gettempdir()) / "uadkit-dry-run")
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted([Path(n) for n in notebooks] or (ROOT / "book").glob("*.ipynb"), key=_order)
    jobs = int(os.environ.get("UADKIT_JOBS", "2"))
    env = {**os.environ, "PYTHONHASHSEED": "0", "TQDM_MININTERVAL": "30"}
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("UADKIT_THREADS", "1")
    env.setdefault("UADKIT_CPU_PINS", "0")  # no kernel caps: bf16 at full speed (uadkit.train.pin_cpu)
    waiting, running, times, failed = list(paths), {}, {}, []
    t_all = time.perf_counter()
    while waiting or running:
        while waiting and len(running) < jobs:
            nb = waiting.pop(0)
            print(f"dry run: {nb.name} ...", flush=True)
            log = open(out / f"{nb.stem}.log", "w+")
            cmd = [sys.executable, "-m", "papermill", "-k", "python3", "--cwd", str(ROOT / "book"), str(nb),
                   str(out / nb.name), "-p", "profile", "paper", "-p", "dry_run", "True", "--no-progress-bar",
                   "--log-level", "WARNING"]
            running[nb] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log,
                           time.perf_counter())
        time.sleep(1)
        for nb, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[nb]
            times[nb.name] = time.perf_counter() - t0
            if proc.returncode:  # papermill's error names the cell and holds the traceback
                failed.append(nb.name)
                log.seek(0)
                print(f"FAILED {nb.name}:\n{log.read()[-6000:]}", flush=True)
            log.close()
            print(f"dry run: {nb.name} {'failed' if nb.name in failed else 'passed'} in {times[nb.name]:.0f} s",
                  flush=True)
    print(f"\nchapter dry runs (paper profile, fake data; {jobs} at a time):")
    for name, t in times.items():
        print(f"  {name:<20} {t:6.0f} s  {'FAILED' if name in failed else 'ok'}")
    print(f"  {'wall time':<20} {time.perf_counter() - t_all:6.0f} s")
    print(f"executed notebooks and their logs in {out}")
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
