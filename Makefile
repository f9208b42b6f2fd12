# imagegen — the two commands are `make run` and `make test`; `make help` lists the rest.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
#: the generated protobuf/gRPC code: a package of its own, which server and client both import
GEN_OUT := imagegen
STAMP := $(VENV)/.installed
# protoc finds the mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help run test lint tools protos check-protos migrate venv sandbox manifests clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)  ## create the virtualenv and install the project with its dev tools

run: $(STAMP)  ## migrate the embedded database and serve gRPC + HTTP with the sandbox vendors
	IMAGEGEN_LOG_FORMAT=$${IMAGEGEN_LOG_FORMAT:-text} $(PY) -m server migrate
	IMAGEGEN_LOG_FORMAT=$${IMAGEGEN_LOG_FORMAT:-text} IMAGEGEN_SANDBOX_PORT=$${IMAGEGEN_SANDBOX_PORT:-8090} \
	  $(PY) -m server serve

migrate: $(STAMP)  ## bring the database at IMAGEGEN_DATABASE_URL to the newest schema
	$(PY) -m server migrate

test: $(STAMP) tools check-protos lint  ## the whole suite, against PostgreSQL (IMAGEGEN_TEST_DATABASE_URL) and SQLite
	$(PY) -m pytest

lint: $(STAMP)  ## ruff (rules, formatting), import-linter (the layering contracts), mypy --strict: pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# bench/ is also a directory: without .PHONY, make would find "bench" up to date and run nothing.
.PHONY: bench
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)  ## benchmarks beside their baselines on PostgreSQL + loopback (not in `make test`): a table and bench/results.json; BENCH_ARGS="--scenario watch --quick --profile"
	$(PY) -m bench $(BENCH_ARGS)

tools:  ## the system tools the suite uses: promtool and prometheus (Debian's prometheus package)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's prometheus package (promtool, prometheus)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null && apt-get install -y -qq prometheus >/dev/null; }; \
	  else echo "make test needs promtool and prometheus: sudo apt-get install prometheus"; exit 1; fi; }

protos: $(STAMP)  ## regenerate $(GEN_OUT)/ from protos/
	rm -rf $(GEN_OUT) && mkdir -p $(GEN_OUT)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. $$(find protos -name '*.proto' | sort)
	find $(GEN_OUT) -type d -exec touch {}/__init__.py \;

check-protos: $(STAMP)  ## fail when the committed generated code differs from what `make protos` makes
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && mkdir -p "$$tmp/$(GEN_OUT)" && \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out="$$tmp" --grpc_python_out="$$tmp" \
	  --mypy_out="$$tmp" --mypy_grpc_out="$$tmp" $$(find protos -name '*.proto' | sort) && \
	find "$$tmp/$(GEN_OUT)" -type d -exec touch {}/__init__.py \; && \
	diff -r -x __pycache__ "$$tmp/$(GEN_OUT)" $(GEN_OUT) >/dev/null || \
	{ echo "$(GEN_OUT)/ is stale: run 'make protos' and commit the result"; exit 1; }

manifests: $(STAMP)  ## regenerate deploy/kubernetes/base's PrometheusRule (from alerts.yml) and backlog query
	$(PY) deploy/kubernetes/generate.py

sandbox: $(STAMP)  ## run the vendor sandbox alone (prints its base URL)
	$(PY) -m sandbox --host 127.0.0.1 --port 8090

clean:  ## remove the virtualenv and local data
	rm -rf $(VENV) var
