# The two commands the README starts with: `make quickstart` and `make test`.
# Both create .venv and install core + every first-party plugin (editable) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must come as a matching pair; this pair installs offline on our CPU machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PLUGIN_TOMLS := $(wildcard plugins/*/*/pyproject.toml)

.PHONY: install quickstart test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.txt $(PLUGIN_TOMLS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -r requirements-dev.txt
	touch $@

quickstart: install
	$(PY) -m core.train $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(PY) -m ruff check .

# The table in benchmarks/README.md: the vision-heavy headline (gradient checkpointing off and
# on, both sides) and the tiny quickstart model. ~20 min on 2 idle cores.
bench: install
	$(PY) benchmarks/step_vs_trl.py --config vision --grad-ckpt both $(ARGS)
	$(PY) benchmarks/step_vs_trl.py --config tiny --grad-ckpt off --max-new-tokens 8 --prompts 4 --steps 9 $(ARGS)
