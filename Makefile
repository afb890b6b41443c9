# Set-up and entry points. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export FASTREID_DATASETS ?= datasets

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-fastreid.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-fastreid.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import promptsg.compat as c; c.build_cython_ranker()"
	touch $@

# The main job: PromptSG and the CLIP baseline trained and evaluated on the synthetic dataset.
demo: setup
	$(PY) tools/run_synthetic.py

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) logs output
