VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup lint typecheck unit test test-kernel demo bench proto docs

setup:
	bash scripts/setup-host.sh

proto:
	$(PY) -m edge_proto.generate

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy edge_common edge_proto csi_lvm node_resource_manager kms_plugin fake_kms edge_demo kernel_guest benchmarks

unit:
	$(PY) -m pytest -m "not kernel" $(PYTEST_ARGS)

test-kernel:
	$(PY) -m kernel_guest pytest

test: lint typecheck unit test-kernel

demo:
	$(PY) -m edge_demo

bench:
	$(PY) benchmarks/nrm_bench.py --write-docs
	$(PY) benchmarks/csi_bench.py --write-docs
	$(PY) benchmarks/kms_bench.py --write-docs

docs:
	$(PY) scripts/gen_docs.py
