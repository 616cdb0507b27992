#!/usr/bin/env bash
# The whole test suite: set-up, lint, types, tests on this kernel, then the real-kernel suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec make test
