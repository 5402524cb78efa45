# Two commands do everything on a fresh machine:
#   make demo   set-up + generate the embedded dataset + train (RFS) + evaluate (23 min on 2 CPU cores)
#   make test   set-up + the test suite
# Set-up is scripts/bootstrap.sh (idempotent). Opt in to upstream detectron2 (compiled CUDA ops,
# needs GitHub access): `make setup LONGTAIL_D2=upstream`.
# The environment the bootstrap installs into: $VENV, else an active virtualenv, else .venv/.
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PY ?= $(VENV)/bin/python
DEMO_CONFIG ?= configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml
DEMO_OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-main test-fast benchmark benchmark-sampling benchmark-loce benchmark-bags benchmark-memory benchmark-overhead benchmark-eval clean

setup:
	VENV=$(abspath $(VENV)) LONGTAIL_D2=$(LONGTAIL_D2) bash scripts/bootstrap.sh

demo: setup
	$(PY) train_net.py --config-file $(DEMO_CONFIG) --resume OUTPUT_DIR $(DEMO_OUTPUT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite again with detectron2's upstream main first on PYTHONPATH (the sources vendored in
# ../shared/vendor, no network; see its README). CI runs it after `make test`.
D2_MAIN_WRAPPER ?= ../shared/vendor/with-detectron2-main.sh
MAIN_PYTEST_ARGS ?=
test-main: setup
	@test -f $(D2_MAIN_WRAPPER) || { echo "test-main: $(D2_MAIN_WRAPPER) not found (set D2_MAIN_WRAPPER to upstream's vendored sources' wrapper)"; exit 2; }
	bash $(D2_MAIN_WRAPPER) $(PY) -c "import detectron2.modeling.roi_heads.fast_rcnn as f, inspect; assert 'use_fed_loss' in inspect.signature(f.FastRCNNOutputLayers.__init__).parameters, 'not detectron2 main'; print('detectron2 main from', f.__file__)"
	bash $(D2_MAIN_WRAPPER) $(PY) -m pytest $(MAIN_PYTEST_ARGS)

# The suite without the end-to-end training tests (seconds instead of minutes).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Trainings on the embedded dataset, each writing its section of docs/benchmarks.md
# (finished runs are reused; ~20 min per model on 2 CPU cores).
benchmark-sampling: setup   # uniform vs repeat-factor sampling
	$(PY) tools/benchmark.py suite sampling
benchmark-loce: setup       # LOCE stage 1 -> stage 2 (EBL)
	$(PY) tools/benchmark.py suite loce
benchmark-bags: benchmark-sampling  # uniform baseline (= BAGS stage 1) -> BAGS stage 2
	$(PY) tools/benchmark.py suite bags

benchmark-memory: setup    # RIO vs RFS; LOCE EBL + MFS vs EBL alone (float16 / float32 / int8)
	$(PY) tools/benchmark.py suite memory

# The headline table: every method x 3 seeds on the embedded dataset (resumable: stop and run
# again at any time). Two runs at a time, one torch thread each (keep the same BENCHMARK_JOBS for
# every seed of a table, the step-time ratios depend on it). On a GPU machine:
# make benchmark BENCHMARK_SIZE=gpu BENCHMARK_JOBS=1
BENCHMARK_SIZE ?= cpu
BENCHMARK_JOBS ?= 2
benchmark: setup
	$(PY) tools/benchmark.py table --size $(BENCHMARK_SIZE) --jobs $(BENCHMARK_JOBS)

# Step-time overhead of EBL / BAGS / Seesaw / EQLv2 / sigmoid CE / fed loss over softmax CE, and of
# the BAGS merge and NorCal at inference, at LVIS v1 scale.
benchmark-overhead: setup
	$(PY) tools/benchmark_overhead.py
	$(PY) tools/benchmark_memory.py

# Official lvis package vs the fast evaluation backends on an LVIS-scale result set.
benchmark-eval: setup
	$(PY) tools/benchmark_eval.py

# The GPU check (tools/gpu_check.py): every LVIS v1 R50 config trained in fp32 and with AMP (fp16)
# on one GPU, step-time ratios against RFS, peak memory, loss checks, eval speed; within an 8-min
# budget. Writes the "GPU check" section of docs/benchmarks.md (CPU smoke version: --device cpu --tiny).
.PHONY: gpu-check
gpu-check: setup
	$(PY) tools/gpu_check.py --device cuda --write-docs

# Every LVIS config (v1 and v0.5, each method and stage, R50 / R101) at the real class count on the
# generated LVIS rehearsal data (longtail.rehearsal): a few iterations with 2 CPU processes,
# checkpoint, resume, evaluation, on detectron2 v0.6 and main (tools/lvis_rehearsal.py; resumable,
# hours on 2 CPU cores). Writes the "LVIS rehearsal" section of docs/benchmarks.md.
# LVIS_REHEARSAL_ARGS=--real-names: detectron2's own lvis_* names on the same data.
LVIS_REHEARSAL_ARGS ?=
.PHONY: lvis-rehearsal
lvis-rehearsal: setup
	$(PY) tools/lvis_rehearsal.py --d2 both $(LVIS_REHEARSAL_ARGS)

clean:
	rm -rf output .pytest_cache
