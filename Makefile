VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
VERSION = $(shell python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE ?= ghcr.io/edge-node-services/edge-node-services:$(VERSION)

.PHONY: setup lint typecheck unit test test-kernel demo bench proto docs image image-smoke

setup:
	bash scripts/setup-host.sh

proto:
	$(PY) -m edge_proto.generate

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy edge_common edge_proto csi_lvm node_resource_manager kms_plugin fake_kms edge_demo kernel_guest benchmarks scripts/image/smoke.py

unit:
	$(PY) -m pytest -m "not kernel and not image" $(PYTEST_ARGS)

test-kernel:
	$(PY) -m kernel_guest pytest

test: lint typecheck unit test-kernel

demo:
	$(PY) -m edge_demo

bench:
	$(PY) benchmarks/nrm_bench.py --write-docs
	$(PY) benchmarks/csi_bench.py --write-docs
	$(PY) benchmarks/kms_bench.py --write-docs
	$(PY) -m kernel_guest --results-dir test-results/crypt-bench run -- \
		$(PY) benchmarks/crypt_bench.py --write-docs
	$(PY) benchmarks/crypt_bench.py --apply test-results/crypt-bench

# The product image (buildah, Debian packages, no registry needed) and its smoke test.
image:
	IMAGE=$(IMAGE) bash scripts/image/build.sh

image-smoke:
	$(PY) scripts/image/smoke.py $(IMAGE)
	$(PY) -m pytest -m image tests/deploy/test_doc_blocks.py $(PYTEST_ARGS)

docs:
	$(PY) scripts/gen_docs.py
