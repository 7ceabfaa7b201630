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

# The tables in benchmarks/README.md: the vision-heavy headline (gradient checkpointing off and
# on, both sides), its G and completion-length sweep, and the tiny quickstart model; each run
# also writes its full results to benchmarks/results/*.json; the last line prints the table. ~6 min
# on 2 idle cores.
BENCH = $(PY) benchmarks/step_vs_trl.py
BENCH_OUT = benchmarks/results
bench: install
	mkdir -p $(BENCH_OUT)
	$(BENCH) --config vision --grad-ckpt both --json $(BENCH_OUT)/vision.json $(ARGS)
	$(BENCH) --config vision --generations 4 --json $(BENCH_OUT)/vision_g4.json $(ARGS)
	$(BENCH) --config vision --generations 16 --json $(BENCH_OUT)/vision_g16.json $(ARGS)
	$(BENCH) --config vision --max-new-tokens 32 --json $(BENCH_OUT)/vision_t32.json $(ARGS)
	$(BENCH) --config vision --max-new-tokens 128 --json $(BENCH_OUT)/vision_t128.json $(ARGS)
	$(BENCH) --config tiny --max-new-tokens 8 --prompts 4 --steps 9 --json $(BENCH_OUT)/tiny.json $(ARGS)
	$(PY) benchmarks/table.py $(addprefix $(BENCH_OUT)/,vision.json vision_g4.json vision_g16.json vision_t32.json vision_t128.json tiny.json)
