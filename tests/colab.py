"""Run chapters as a Colab user does: the notebook alone, in an environment that holds only what Colab
preinstalls, installing uadkit through the chapter's own install cell (``make colab-test``).

    python tests/colab.py [book/baseline.ipynb ...]     # default: the opening chapter

1. builds a wheel of this checkout (``pip wheel --no-deps``);
2. makes a fresh virtual environment holding Colab's preinstalled set (:data:`COLAB_SET`: torch, torchvision,
   numpy, pandas, matplotlib, scikit-learn, scikit-image, seaborn, tqdm, and the Jupyter kernel) and nothing of
   uadkit's own dependencies;
3. copies each chapter's ``.ipynb`` alone into an empty folder, points its install cell's
   ``uadkit @ git+<repository>`` at the wheel (the machine has no route to the repository), and executes it
   in the smoke profile with ``google.colab`` importable (an IPython start-up file puts a stand-in into
   ``sys.modules``, as Colab's runtime has the real one imported), so the install cell runs ``%pip install``.

A dependency missing from pyproject.toml fails the chapter with ModuleNotFoundError, as it would in Colab.
The environment is kept in ``$COLAB_TEST_DIR`` (default ``$TMPDIR/uadkit-colab``) and reused when its
package list is unchanged. Prints each chapter's time; exits non-zero if any failed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a Colab runtime has before a notebook installs anything (the part of it the chapters touch), at the
# versions this repository pins where it pins them, so that pip takes them from the same place.
COLAB_SET = ["torch==2.14.1", "torchvision==0.29.1", "numpy<2.4", "pandas", "matplotlib", "scikit-learn",
             "scikit-image", "seaborn", "tqdm", "scipy", "pillow", "ipykernel", "nbclient", "nbformat"]
INSTALL = re.compile(r'"uadkit @ git\+[^"]+"')
COLAB_STUB = ("import sys, types\n"
              "google = sys.modules.setdefault('google', types.ModuleType('google'))\n"
              "google.colab = sys.modules.setdefault('google.colab', types.ModuleType('google.colab'))\n")


def run(cmd: list[str], **kw) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def colab_env(base: Path) -> Path:
    """A virtual environment with COLAB_SET only (kept and reused while COLAB_SET is unchanged)."""
    env, stamp = base / "venv", base / "venv" / "colab-set.txt"
    if stamp.is_file() and stamp.read_text() == "\n".join(COLAB_SET):
        return env
    shutil.rmtree(env, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(env)])
    run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", *COLAB_SET])
    stamp.write_text("\n".join(COLAB_SET))
    return env


def wheel(base: Path) -> Path:
    out = base / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)])
    return next(out.glob("uadkit-*.whl"))


def execute(env: Path, notebook: Path, whl: Path, base: Path) -> float:
    """The chapter alone in an empty folder, its install cell pointed at ``whl``, executed in ``env``."""
    folder = base / "run" / notebook.stem
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    nb, n = json.loads(notebook.read_text()), 0
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            source, k = INSTALL.subn(f'"uadkit @ {whl.as_uri()}"', "".join(cell["source"]))
            cell["source"], n = source, n + k
    if n != 1:
        raise SystemExit(f"{notebook.name}: expected one install cell with 'uadkit @ git+...', found {n}")
    (folder / notebook.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    ipython = base / "ipython"
    (ipython / "profile_default" / "startup").mkdir(parents=True, exist_ok=True)
    (ipython / "profile_default" / "startup" / "00-google-colab.py").write_text(COLAB_STUB)
    # a fresh kernel: none of the checkout's settings (UADKIT_*, PYTHONPATH) leak in, as in a new Colab runtime
    child = {k: v for k, v in os.environ.items() if not k.startswith(("UADKIT_", "PYTHON", "VIRTUAL_ENV"))}
    child |= {"IPYTHONDIR": str(ipython), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
              "PATH": f"{env / 'bin'}{os.pathsep}{child.get('PATH', '')}"}
    code = ("import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], 4); "
            "nbclient.NotebookClient(nb, timeout=1800, kernel_name='python3').execute(); "
            "nbformat.write(nb, sys.argv[1])")
    t0 = time.perf_counter()
    run([str(env / "bin" / "python"), "-c", code, notebook.name], cwd=folder, env=child)
    return time.perf_counter() - t0


def main(notebooks: list[str]) -> int:
    base = Path(os.environ.get("COLAB_TEST_DIR") or Path(tempfile.gettempdir()) / "uadkit-colab")
    base.mkdir(parents=True, exist_ok=True)
    paths = [Path(n).resolve() for n in notebooks] or [ROOT / "book" / "baseline.ipynb"]
    t0 = time.perf_counter()
    env, whl = colab_env(base), wheel(base)
    print(f"Colab-like environment and wheel ready in {time.perf_counter() - t0:.0f} s", flush=True)
    failed = []
    for nb in paths:
        try:
            print(f"colab test: {nb.name} executed in {execute(env, nb, whl, base):.0f} s", flush=True)
        except subprocess.CalledProcessError:
            failed.append(nb.name)
            print(f"colab test: {nb.name} FAILED (the error is above)", flush=True)
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
