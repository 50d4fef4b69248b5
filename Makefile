# `make test` and `make demo` set up .venv themselves on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CUDA_COMPILE := $(VENV)/cuda-compile
# Tests run on CPU with 8 simulated devices (multi-device tests need them).
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
            TF_CPP_MIN_LOG_LEVEL=2

.PHONY: test demo bench venv clean
DEMO_DIR ?= workdirs/digits

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	# jax's CUDA plugin (XLA's GPU compiler, tests/test_compile_tool.py) beside the
	# environment, not in it: on a host without a GPU it logs at every JAX start-up.
	JAX=$$($(PY) -c 'import jax; print(jax.__version__)') && $(PY) -m pip install --quiet \
	    --no-deps --target $(CUDA_COMPILE) "jax-cuda12-plugin==$$JAX" "jax-cuda12-pjrt==$$JAX"
	touch $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist worksteal -q --durations=30 tests

# The embedded default: a tiny DeiT with MCTF on scikit-learn's digits, then its evaluation
# at several r (about 10 minutes on 2 CPU cores), its accuracy-vs-GFLOPs plot and the merges
# of four test digits. Rerunning resumes or re-evaluates.
demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) train.py --config=configs/digits.py --workdir=$(DEMO_DIR)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) eval.py --config=configs/digits.py --checkpoint=$(DEMO_DIR)
	$(PY) -m mctf_jax.tools.visualize plot --results=$(DEMO_DIR)/eval/results.json \
	    --out=$(DEMO_DIR)/acc_vs_gflops.png --title="MCTF on the digits (make demo)"
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m mctf_jax.tools.visualize --config=configs/digits.py \
	    --checkpoint=$(DEMO_DIR) --examples=4 --panel_px=128 --out=$(DEMO_DIR)/merges.png

# Speed benchmarks (not tests): forward speed-ups and fusion share for the four MCTF configs,
# a batch-size sweep of DeiT-S and DeiT-T, then the MCTF train step against a plain one
# (DeiT-S, batch 32). About 40 minutes on 2 CPU cores; figures and JSON in $(BENCH_DIR).
BENCH_DIR ?= workdirs/bench
bench: $(STAMP)
	mkdir -p $(BENCH_DIR)
	set -o pipefail; TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/forward.py --json=$(BENCH_DIR)/forward.json \
	    | tee $(BENCH_DIR)/forward.txt
	set -o pipefail; TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/forward.py --configs=deit_s,deit_t \
	    --batch_sizes=1,8,32,128 --json=$(BENCH_DIR)/batch_sweep.json | tee $(BENCH_DIR)/batch_sweep.txt
	set -o pipefail; TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/train_step.py --config=configs/deit_s.py \
	    --batch_size=32 --json=$(BENCH_DIR)/train_step.json | tee $(BENCH_DIR)/train_step.txt

clean:
	rm -rf $(VENV)
