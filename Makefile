# The two commands of the README. Each creates .venv and installs what it needs.
#   make demo   the main job: influence-core demo (flipped-label detection on digits)
#   make test   lint, then the full test suite (what CI runs: .ci/run)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The core and the three distributions beside it (each backend, the conformance suite).
DISTRIBUTIONS := backends/torch backends/tensorflow conformance_tests plugins/influence-jax
PYPROJECTS := pyproject.toml $(addsuffix /pyproject.toml,$(DISTRIBUTIONS))
STAMP := $(VENV)/.installed-$(shell cat $(PYPROJECTS) | cksum | cut -d' ' -f1)

.PHONY: demo test lint conformance bench bench-peers clean

$(STAMP): $(PYPROJECTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# influence-core-torch pins torch==2.13.0 (a CPU build here); never let pip pick a CUDA build.
	$(PY) -m pip install --quiet -e '.[tests,demo,docs,distributed]' $(addprefix -e ,$(DISTRIBUTIONS))
	# Keras 2 (tf_keras) is tested too. --no-deps: it requires the full 'tensorflow'
	# distribution, which would overwrite tensorflow-cpu's files; match TF's minor version.
	$(PY) -m pip install --quiet --no-deps "tf_keras~=$$(TF_CPP_MIN_LOG_LEVEL=3 $(PY) -c 'import tensorflow as tf; print(tf.__version__.rsplit(".", 1)[0])').0"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/influence-core demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# One worker per core (pytest-xdist; at most 4: each loads torch, TensorFlow and JAX), each
# with one OpenMP thread: two workers with torch's default threads on 2 cores spun against
# each other and ran 9x slower (221 s against 25 s on four of the slowest test files).
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --maxprocesses 4

conformance: $(STAMP)
	$(PY) -m influence_conformance --backend torch
	$(PY) -m influence_conformance --backend tensorflow
	JAX_ENABLE_X64=1 $(PY) -m influence_conformance --backend jax

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_influence.py

# Side by side with captum, dattri, pyDVL and Influenciae, each in its own benchmark-only
# environment under benchmarks/.envs/; writes benchmarks/RESULTS.md and benchmarks/peers.png.
bench-peers: $(STAMP)
	bash benchmarks/peers/setup_envs.sh
	$(PY) benchmarks/peers/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
