# Two commands do everything on a fresh machine:
#   make demo   set-up + generate the embedded dataset + train (RFS) + evaluate (~15 min on 2 CPU cores)
#   make test   set-up + the test suite
# Set-up is scripts/bootstrap.sh (idempotent). Opt in to upstream detectron2 (compiled CUDA ops,
# needs GitHub access): `make setup LONGTAIL_D2=upstream`.
PY ?= .venv/bin/python
DEMO_CONFIG ?= configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast benchmark-sampling clean

setup:
	LONGTAIL_D2=$(LONGTAIL_D2) bash scripts/bootstrap.sh

demo: setup
	$(PY) train_net.py --config-file $(DEMO_CONFIG) --resume OUTPUT_DIR $(DEMO_OUTPUT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite without the end-to-end training tests (seconds instead of minutes).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Uniform vs repeat-factor sampling on the embedded dataset; writes docs/benchmarks.md's section.
benchmark-sampling: setup
	$(PY) tools/benchmark_sampling.py

clean:
	rm -rf output .pytest_cache
