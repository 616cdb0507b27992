#!/usr/bin/env bash
# `make image`: builds the project image from the Dockerfile with buildah (no daemon, no
# registry needed) and writes it as two archives for air-gapped nodes:
#   dist/edge-node-services-VERSION.oci.tar      OCI image layout (skopeo, podman, buildah)
#   dist/edge-node-services-VERSION.docker.tar   docker-archive (ctr -n k8s.io images import,
#                                                 k3s agent/images/, docker load)
#
# Base: BASE_IMAGE=debian:bookworm-slim (or any registry image) uses that base; unset, a
# Debian minbase is built here from Debian packages (scripts/image/build-base.sh), and the
# build's apt-get runs use this host's own apt sources, mounted in read-only.
# Python dependencies are pinned to the versions installed in .venv (the ones the tests ran
# against) when it exists; pip trusts this host's CA bundle.
#
# Cached: the base image (rebuilt weekly). Not cached: buildah's layers (with the vfs storage
# driver every layer is a full copy of the file system, so the build keeps only the base and
# the image, and removes the image it replaces) and the Python wheels (~25 MB, fetched again).
set -euo pipefail
cd "$(dirname "$0")/../.."

STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
ISOLATION=${ISOLATION:-chroot}
OUT=${OUT:-dist}
VENV=${VENV:-.venv}
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE=${IMAGE:-ghcr.io/edge-node-services/edge-node-services:$VERSION}
buildah=(buildah --storage-driver "$STORAGE_DRIVER")

for tool in buildah python3; do
  command -v "$tool" >/dev/null || { echo "image: $tool is missing: run scripts/setup-host.sh" >&2; exit 2; }
done

started=$(date +%s)
work=$(mktemp -d /tmp/edge-image.XXXXXX)
trap 'rm -rf "$work"' EXIT

build_args=()
if [ -n "${BASE_IMAGE:-}" ]; then
  base=$BASE_IMAGE
else
  base=$(bash scripts/image/build-base.sh | tail -n 1)
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && build_args+=(--volume "$f:$f:ro")
  done
fi

# Build inputs from this host, mounted read-only at /run/edge-build for the pip step: the
# versions the tests ran against (constraints) and the CA bundle this host trusts (a TLS proxy
# in front of the package index works in the build as it does on the host).
mkdir -p "$work/edge-build"
if [ -x "$VENV/bin/python" ]; then
  "$VENV/bin/python" -m pip freeze --exclude-editable --all 2>/dev/null \
    | grep -E '^[A-Za-z0-9_.-]+==' > "$work/edge-build/constraints.txt" || true
fi
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] && cp "$ca" "$work/edge-build/ca.crt"
build_args+=(--volume "$work/edge-build:/run/edge-build:ro")

previous=$("${buildah[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
echo "image: building $IMAGE from $base" >&2
"${buildah[@]}" bud --isolation "$ISOLATION" --layers=false --format oci \
  --build-arg "BASE_IMAGE=$base" "${build_args[@]}" \
  --tag "$IMAGE" --file Dockerfile .

current=$("${buildah[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "${buildah[@]}" rmi "$previous" >/dev/null 2>&1 || true  # still used by a container: kept
fi

mkdir -p "$OUT"
oci="$OUT/edge-node-services-$VERSION.oci.tar"
docker="$OUT/edge-node-services-$VERSION.docker.tar"
rm -f "$oci" "$docker"
"${buildah[@]}" push --quiet "$IMAGE" "oci-archive:$oci:$IMAGE"
"${buildah[@]}" push --quiet "$IMAGE" "docker-archive:$docker:$IMAGE"

# A docker-archive holds the layers uncompressed: its size is the image's unpacked size.
size=$(stat -c %s "$docker")
elapsed=$(( $(date +%s) - started ))
printf 'image: %s\n  uncompressed size: %d MB (layers)\n  archives: %s, %s\n  build time: %d s\n' \
  "$IMAGE" $(( size / 1000000 )) "$oci" "$docker" "$elapsed"
