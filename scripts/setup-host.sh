#!/usr/bin/env bash
# Installs what the services and their tests need on a Debian/Ubuntu host, then a virtualenv
# with the project in it. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# buildah + mmdebstrap: `make image` (daemonless build from Debian packages, no registry);
# containerd + runc: the image stage imports the image and runs the guide's `ctr` commands.
APT_PACKAGES=(lvm2 cryptsetup-bin e2fsprogs xfsprogs btrfs-progs util-linux mount softhsm2 opensc
              qemu-system-x86 python3 python3-venv make ca-certificates kmod procps strace
              buildah mmdebstrap containerd runc)

if [ "$(id -u)" != 0 ]; then
  echo "setup-host: run as root (it installs apt packages and creates loop devices)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ! command -v kubectl >/dev/null 2>&1; then missing+=(kubernetes-client); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# An editable install maps the top-level packages that exist when it runs: redo it when the
# project's metadata or its set of packages changes.
packages=$(ls -d -- */__init__.py | tr '\n' ' ')
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ "$(cat "$stamp")" != "$packages" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  printf '%s' "$packages" > "$stamp"
fi
# The checkout's own tools (tests, edge_demo, kernel_guest, fake_kms, benchmarks) are not in the
# product wheel; a .pth puts the checkout on this venv's path so they import from anywhere.
purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$PWD" > "$purelib/edge-node-services-checkout.pth"
# Stubs are generated from proto/ on every setup, so they can never be stale.
"$VENV/bin/python" -m edge_proto.generate
