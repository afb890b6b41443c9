# Set-up and entry points. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export FASTREID_DATASETS ?= datasets

.PHONY: setup demo test compare clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-fastreid.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-fastreid.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import promptsg.engine.compat as c; c.build_cython_ranker()"
	touch $@

# The main job: PromptSG and the CLIP baseline trained and evaluated on the synthetic dataset.
demo: setup
	$(PY) tools/run_synthetic.py

# The demo's PromptSG and CLIP baseline beside CLIP-ReID and FastReID's BoT R18 (tools/compare.py):
# accuracy, parameters, GFLOPs, CPU images/s and training time in logs/synthetic/compare.md and
# compare.png. Trains what is missing: the demo runs (tools/run_synthetic.py writes results.json
# last), CLIP-ReID (both stages) and BoT R18.
SYNTHETIC := logs/synthetic
compare: setup $(SYNTHETIC)/results.json $(SYNTHETIC)/clipreid_small_vit/results.json $(SYNTHETIC)/bot_R18/results.json
	$(PY) tools/compare.py $(SYNTHETIC)/promptsg_small_vit $(SYNTHETIC)/clip_baseline_small_vit \
		$(SYNTHETIC)/clipreid_small_vit $(SYNTHETIC)/bot_R18 --output $(SYNTHETIC)

$(SYNTHETIC)/results.json: | setup
	$(PY) tools/run_synthetic.py

$(SYNTHETIC)/clipreid_small_vit/results.json: | $(SYNTHETIC)/results.json
	$(PY) tools/train_net.py --config-file projects/PromptSG/configs/Synthetic/clipreid_small_vit.yml --resume

$(SYNTHETIC)/bot_R18/results.json: | setup
	$(PY) tools/train_net.py --config-file configs/Synthetic/bagtricks_R18.yml --resume

# The tests run in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them, so
# that a file's module fixtures (tiny datasets, trained tiny runs) are built once.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) logs output
