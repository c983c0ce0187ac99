# Two entry points for a fresh clone (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline default weights: the shared folder beside the checkout, unless VITLENS_WEIGHTS is set.
SHARED_MODELS := $(abspath ../shared/models)
ifeq ($(origin VITLENS_WEIGHTS), undefined)
  ifneq ($(wildcard $(SHARED_MODELS)),)
    export VITLENS_WEIGHTS := $(SHARED_MODELS)
    export HF_HUB_OFFLINE := 1
  endif
endif

.PHONY: setup demo test bench-tis
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q -e ".[all,test]"
	$(BIN)/python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $@

demo: setup
	$(BIN)/vitlens demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench-tis: setup
	$(BIN)/python benchmarks/tis_speed.py
