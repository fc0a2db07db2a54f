"""Paper tables kept as data, and every chapter's measured results written as data.

* ``paper_table("adtr_table1")``: a table transcribed from a paper (``tables/*.csv``,
  columns ``table, method, category, metric, value, source``; values as printed, in %).
* ``compare(paper, ours)``: the two side by side with the difference, clearly labelled.
* ``record(chapter, table, rows, ...)``: writes this run's numbers as JSON under
  ``$UADKIT_RESULTS`` (default ``_build/results/``), with profile, dataset, seed, wall
  time and versions, so GPU runs and regression checks read numbers, not notebooks.
* ``run(chapter, name, settings, fn, profile=...)``: one training run of a table. In the
  paper profile its result is recorded as soon as it finishes and, when the chapter runs
  again with the same ``settings``, read back instead of trained again, so a run cut off
  by a time limit loses at most one training. ``checkpoint(chapter, name, settings)`` is
  the run's own checkpoint file (a checkpoint of other settings is refused by ``train.fit``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import resources
from pathlib import Path

import pandas as pd

__all__ = ["paper_table", "available_tables", "compare", "record", "load_results", "results_dir", "run",
           "run_key", "checkpoint", "RECORD_MIME"]

COLUMNS = ["table", "method", "category", "metric", "value", "source"]


def available_tables() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files(__package__).joinpath("tables").iterdir()
                  if p.name.endswith(".csv"))


def paper_table(name: str) -> pd.DataFrame:
    """A transcribed paper table as a long DataFrame (one row per method × category × metric)."""
    path = resources.files(__package__).joinpath("tables", f"{name}.csv")
    if not path.is_file():
        raise KeyError(f"no paper table {name!r}; available: {', '.join(available_tables())}")
    with path.open() as f:
        df = pd.read_csv(f)
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{name}.csv lacks columns {sorted(missing)}")
    return df


def compare(paper: pd.DataFrame, ours: dict[str, float] | pd.Series, *, method: str,
            scale: float = 100.0, decimals: int = 1) -> pd.DataFrame:
    """Paper numbers of ``method`` next to this run's (``ours``: category → value in [0,1],
    multiplied by ``scale`` to the paper's percent), and the difference this run − paper.
    Categories missing on either side show as NaN rather than being dropped."""
    p = paper[paper["method"] == method].set_index("category")["value"].rename(f"paper ({method})")
    o = (pd.Series(ours, dtype=float) * scale).rename("this run")
    out = pd.concat([p, o], axis=1)
    out["this run − paper"] = out["this run"] - out[p.name]
    return out.round(decimals)


def results_dir() -> Path:
    """``$UADKIT_RESULTS``, else ``_build/results`` of the book this runs in (the nearest folder
    upwards holding ``_config.yml``; chapters run with ``book/`` as working directory), else of ``.``."""
    if "UADKIT_RESULTS" in os.environ:
        return Path(os.environ["UADKIT_RESULTS"])
    here = Path.cwd().resolve()
    book = next((p for p in (here, *here.parents) if (p / "_config.yml").is_file()), here)
    return book / "_build" / "results"


def record(chapter: str, table_name: str, rows: list[dict], *, profile: str, dataset: str, seed: int,
           wall_time_s: float, extra: dict | None = None) -> Path:
    """Write ``rows`` (a list of dicts of plain numbers/strings) atomically to
    ``$UADKIT_RESULTS/<chapter>/<table_name>.json``; returns the path."""
    import torch

    from .. import __version__

    payload = {
        "chapter": chapter, "table": table_name, "rows": rows, "profile": profile, "dataset": dataset,
        "seed": seed, "wall_time_s": round(float(wall_time_s), 2),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uadkit": __version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        **(extra or {}),
    }
    path = results_dir() / chapter / f"{table_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(payload, indent=1, default=float)
    tmp.write_text(text)
    os.replace(tmp, path)
    _keep_in_notebook(json.loads(text))
    return path


RECORD_MIME = "application/vnd.uadkit.record+json"


def _keep_in_notebook(payload: dict) -> None:
    """In a notebook, the record also becomes an output of the cell (a mime type no front end draws), so an
    executed chapter carries its own results and the book's "Reproduction status" page reads them from the
    committed notebooks; outside IPython nothing happens."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None and not str(payload.get("table", "")).startswith("runs/"):
        display({RECORD_MIME: payload}, raw=True)


def load_results(chapter: str, table_name: str) -> dict:
    path = results_dir() / chapter / f"{table_name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded results {path}; run the chapter '{chapter}' first")
    return json.loads(path.read_text())


def run_key(name: str, settings: dict) -> str:
    """``<name>-<hash of settings>``: the file name of one run's record and checkpoint. Settings are
    hashed as sorted JSON, so any change to them (a learning rate, an epoch count) is another run."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return f"{safe}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def checkpoint(chapter: str, name: str, settings: dict) -> Path:
    """Where run ``name`` with ``settings`` of ``chapter`` keeps its training checkpoint."""
    return results_dir() / chapter / "checkpoints" / f"{run_key(name, settings)}.pt"


def run(chapter: str, name: str, settings: dict, fn, *, profile: str, resume: bool | None = None):
    """The result of one training run: ``fn()`` (a dict of plain numbers), recorded as soon as it returns.

    With ``resume`` (default: in the paper profile, outside a dry run) a run recorded before with
    the same ``chapter``, ``name`` and ``settings`` is not trained again: its recorded result is
    returned, and a line says so. The smoke profile always trains, so its checks test the code.
    """
    from .. import dryrun

    if resume is None:
        resume = profile == "paper" and not dryrun.active()
    key = run_key(name, settings)
    path = results_dir() / chapter / "runs" / f"{key}.json"
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings, sort_keys=True, default=str)):
            print(f"{name}: recorded on {saved.get('timestamp', '?')}, not trained again ({path})")
            return saved["result"]
    t0 = time.perf_counter()
    result = fn()
    record(chapter, f"runs/{key}", [], profile=profile, dataset=str(settings.get("dataset", "")),
           seed=int(settings.get("seed", 0)), wall_time_s=time.perf_counter() - t0,
           extra={"name": name, "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
                  "result": result})
    return result
