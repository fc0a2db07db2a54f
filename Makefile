# The two commands of the README: `make book` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test setup clean

setup: $(STAMP)

# The virtual environment, the pinned requirements (torch from plain pip) and uadkit itself.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Unit tests, then every chapter re-executed (smoke profile) with its key numbers checked.
test: $(STAMP)
	MPLBACKEND=Agg PYTHONHASHSEED=0 $(PY) -m pytest tests book --nbval-lax --nbval-current-env -p no:cacheprovider

# The book, from the committed executed notebooks, into _build/html; any warning fails.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

clean:
	rm -rf _build
