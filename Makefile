# Every target that runs code creates .venv and installs what it needs, so a fresh clone works.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Real data for tests and benchmarks sits beside the checkout; tests skip when it is absent.
export GENLAB_DATA ?= $(abspath ../shared/data)
# Tests start subprocesses (torchrun, gloo workers) on few cores: OpenMP threads that spin while
# waiting starve each other there (5-20x slower measured on 2 cores); passive waiting avoids it.
test test-slow: export OMP_WAIT_POLICY = PASSIVE

.PHONY: install install-dev install-bench demo test test-slow test-browser bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23"

# Stamps make re-installs cheap; they are re-made when pyproject.toml changes.
$(VENV)/.stamp-base: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@
$(VENV)/.stamp-dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[dev]"
	touch $@ $(VENV)/.stamp-base
$(VENV)/.stamp-bench: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[dev,bench]"
	touch $@ $(VENV)/.stamp-dev $(VENV)/.stamp-base

install: $(VENV)/.stamp-base
install-dev: $(VENV)/.stamp-dev
install-bench: $(VENV)/.stamp-bench

demo: install
	$(VENV)/bin/genlab demo --run-dir runs/demo

test: install-dev
	$(PY) -m pytest -m "not slow" -q

test-slow: install-dev
	$(PY) -m pytest -m "slow" -q

# The report in a real browser: Playwright drives the system's Chromium (`playwright install` needs a network).
test-browser: install-dev
	@$(PY) -c "import playwright" 2>/dev/null || { echo "test-browser: installing playwright into $(VENV)"; $(PIP) install "playwright>=1.40"; }
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$GENLAB_CHROMIUM" ] || { \
	  if command -v apt-get >/dev/null; then echo "test-browser: installing chromium with apt-get"; \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; \
	  else echo "test-browser needs Chromium: install it with your package manager, or set GENLAB_CHROMIUM=/path/to/chrome"; exit 2; fi; }
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -m browser -q

# Both ratios of issue 17: the training step (eager and compiled genlab vs diffusers, per FLOP) and sampling
# (DDIM-50 and DPM-Solver++ 10, ms per image vs diffusers' schedulers on the same weights). The compiles take
# minutes on a small CPU the first time; inductor's on-disk cache makes later runs start faster.
bench: install-bench
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/train_throughput.py --bf16 --compile --threads 1
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/sampling_speed.py --compile --batch-size auto --repeats 3

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
