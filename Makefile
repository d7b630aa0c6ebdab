# The two commands of the README: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: install data demo test lint clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import mocov3, torch, torchvision" || (echo "install failed: see pip output above" && exit 1)
	@touch $@

install: $(VENV)/.installed

data: install
	@PYTHON=$(PY) bash scripts/ensure-fashion-mnist.sh

demo: install data
	$(PY) -m mocov3 pretrain --config demo --out $(OUT) --overwrite
	@echo "plots: $(OUT)/loss.png $(OUT)/lr.png $(OUT)/momentum.png $(OUT)/knn.png $(OUT)/stability.png $(OUT)/grad_norms.png; summary: $(OUT)/summary.json"

test: install data lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mocov3 tests benchmarks docs/experiments/scripts

clean:
	rm -rf runs .pytest_cache .ruff_cache
