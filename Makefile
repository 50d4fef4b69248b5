# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests run on CPU with 8 simulated devices (multi-device tests need them).
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
            TF_CPP_MIN_LOG_LEVEL=2

.PHONY: test demo venv clean
DEMO_DIR ?= workdirs/digits

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -q --durations=15 tests

# The embedded default: a tiny DeiT with MCTF on scikit-learn's digits, then its evaluation
# at several r (about 10 minutes on 2 CPU cores). Rerunning resumes or re-evaluates.
demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) train.py --config=configs/digits.py --workdir=$(DEMO_DIR)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) eval.py --config=configs/digits.py --checkpoint=$(DEMO_DIR)

clean:
	rm -rf $(VENV)
