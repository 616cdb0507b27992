#!/usr/bin/env bash
# The product's main job, end to end on this machine (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec make demo
