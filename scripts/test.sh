#!/usr/bin/env bash
# The whole test suite: set-up, lint, types, tests on this kernel, the real-kernel suite, then
# the image stage: build the product image (buildah, Debian packages) and smoke-test it inside.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
make test
make image image-smoke
