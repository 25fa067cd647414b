# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   ?= .venv
# The test environment's pins: pip takes these from the local cache; an unpinned torch downloads gigabytes.
PINS   := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dali,test,plots,onnx,tb,timm]' $(PINS)
	touch $@

demo: setup
	$(VENV)/bin/kdpipe demo --out demo

test: setup
	$(VENV)/bin/python -m pytest -q
