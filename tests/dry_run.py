"""Execute chapters in the paper profile's dry run and fail on any error (``make dry-run``).

    python tests/dry_run.py [book/adtr.ipynb ...]    # default: every chapter

Each chapter runs with papermill, ``-p profile paper -p dry_run True``, into a temporary folder
(``$DRY_RUN_OUT``, default ``$TMPDIR/uadkit-dry-run``); the committed notebooks are not touched.
Prints each chapter's wall time and exits non-zero if any chapter failed.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(notebooks: list[str]) -> int:
    import papermill

    out = Path(os.environ.get("DRY_RUN_OUT") or Path(tempfile.gettempdir()) / "uadkit-dry-run")
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(n) for n in notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    os.environ.setdefault("UADKIT_CPU_PINS", "0")  # no kernel caps: bf16 at full speed (uadkit.train.pin_cpu)
    times, failed = {}, []
    for nb in paths:
        t0 = time.perf_counter()
        print(f"dry run: {nb.name} ...", flush=True)
        try:
            papermill.execute_notebook(str(nb), str(out / nb.name), parameters={"profile": "paper", "dry_run": True},
                                       cwd=str(ROOT / "book"), kernel_name="python3", progress_bar=False,
                                       request_save_on_cell_execute=False)
        except Exception as e:  # papermill's PapermillExecutionError names the cell and the traceback
            failed.append(nb.name)
            print(f"FAILED {nb.name}:\n{e}", flush=True)
        times[nb.name] = time.perf_counter() - t0
        print(f"dry run: {nb.name} {'failed' if nb.name in failed else 'passed'} in {times[nb.name]:.0f} s", flush=True)
    print("\nchapter dry runs (paper profile, fake data):")
    for name, t in times.items():
        print(f"  {name:<20} {t:6.0f} s  {'FAILED' if name in failed else 'ok'}")
    print(f"  {'total':<20} {sum(times.values()):6.0f} s")
    print(f"executed notebooks in {out}")
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
