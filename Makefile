# Two commands do all set-up on a fresh machine:
#   make demo   federated fine-tuning end to end on loopback (coordinator + client processes)
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo-out
DEMO_ARGS ?= --model tiny --clients 3 --cycles 2

.PHONY: venv test demo demo-quick proto clean

# torch goes in first and alone: asked for by another package, pip would pull the CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/fedcybgd demo $(DEMO_ARGS) --out $(DEMO_OUT)

proto: venv
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
