# The two commands of the README: `make demo` and `make test`. Both install what they need:
# the demo the package with its plots and TensorBoard, the tests every extra and the tools.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
OUT ?= runs/demo
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-demo data demo test lint clean

define check_install
	@$(PY) -c "import mocov3, torch, torchvision" || (echo "install failed: see pip output above" && exit 1)
	@touch $@
endef

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(check_install)

$(VENV)/.installed-demo: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -f $(VENV)/.installed || ($(PIP) -e '.[plots,tensorboard]' 2>&1 | grep -v "^WARNING: Location" || true)
	$(check_install)

install: $(VENV)/.installed

install-demo: $(VENV)/.installed-demo

data:
	@PYTHON=$(PY) bash scripts/ensure-fashion-mnist.sh

demo: install-demo data
	$(PY) -m mocov3 pretrain --config demo --out $(OUT) --overwrite
	@echo "plots: $(OUT)/loss.png $(OUT)/lr.png $(OUT)/momentum.png $(OUT)/knn.png $(OUT)/stability.png $(OUT)/grad_norms.png; summary: $(OUT)/summary.json"

test: install data lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mocov3 tests benchmarks docs/experiments/scripts

clean:
	rm -rf runs .pytest_cache .ruff_cache
