#!/usr/bin/env bash
# Builds a minimal Debian base image from Debian's own packages (mmdebstrap, variant minbase:
# what debian:bookworm-slim holds) for hosts that cannot pull from a container registry, and
# stores it in buildah's local storage as $BASE_NAME (printed on the last line).
#
# The packages come from the mirror this host's apt already uses (/etc/apt/sources.list and
# /etc/apt/sources.list.d/*.list|*.sources), read at build time. The base keeps no apt source:
# the image build mounts the host's sources in for its own apt-get runs (scripts/image/build.sh).
#
# Cached: the base is rebuilt only when its recipe (this file), the host's apt sources or the
# week change (security updates arrive at least weekly).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=${SUITE:-bookworm}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
buildah=(buildah --storage-driver "$STORAGE_DRIVER")

apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && printf '%s\n' "$f"
  done
  return 0
}

mapfile -t sources < <(apt_sources)
if [ ${#sources[@]} -eq 0 ]; then
  echo "build-base: this host has no apt sources (/etc/apt/sources.list*); configure apt first" >&2
  exit 2
fi
if ! cat "${sources[@]}" | grep -qw "$SUITE"; then
  echo "build-base: the host's apt sources do not serve Debian $SUITE; set SUITE or fix apt" >&2
  exit 2
fi

recipe=$( { cat "$0"; cat "${sources[@]}"; echo "$SUITE"; date -u +%G-%V; } | sha256sum | cut -c1-12)
BASE_NAME=${BASE_NAME:-localhost/edge-node-services-base:$SUITE-$recipe}

if "${buildah[@]}" inspect --type image "$BASE_NAME" >/dev/null 2>&1; then
  echo "build-base: $BASE_NAME is cached" >&2
  echo "$BASE_NAME"
  exit 0
fi

work=$(mktemp -d /tmp/edge-base.XXXXXX)
container=""
cleanup() {
  [ -n "$container" ] && "${buildah[@]}" rm "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# merged-usr hook: /usr merged without the usrmerge package (and the perl it pulls in).
echo "build-base: mmdebstrap $SUITE (minbase) from the host's apt sources" >&2
# No manuals, info pages, translations or docs but the copyright files: these dpkg filters
# stay in the base, so the image build's apt-get installs honour them too.
mmdebstrap --variant=minbase --mode=root --format=tar --quiet \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/*' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
  "$SUITE" "$work/rootfs.tar" "${sources[@]}"

container=$("${buildah[@]}" from scratch)
"${buildah[@]}" add "$container" "$work/rootfs.tar" / >/dev/null
"${buildah[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label org.opencontainers.image.description="Debian $SUITE minbase built with mmdebstrap" \
  "$container"
"${buildah[@]}" commit --quiet --rm "$container" "$BASE_NAME" >/dev/null
container=""
echo "$BASE_NAME"
