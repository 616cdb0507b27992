# syntax=docker/dockerfile:1
#
# One image for the three commands: csi-lvm, node-resource-manager, kms-plugin.
#   make image                      # buildah, no registry needed (README, "Build the image")
#   docker build -t ghcr.io/edge-node-services/edge-node-services:0.1.0 .   # with a registry
# The manifests in deploy/ set `command:`; the image has no entry point of its own.
# It holds the commands and the tools they call, nothing else: no compiler, no pip, no tests.

ARG BASE_IMAGE=debian:bookworm-slim

# --- build: a virtualenv with the project and its dependencies (binary wheels: no compiler).
# The build hook (setup.py) generates the gRPC stubs from proto/.
FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ONLY_BINARY=:all: \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/edge-node-services
WORKDIR /src
# the context is an allowlist (.dockerignore): packaging metadata, proto/ and the five packages
COPY . .
# `make image` mounts the versions the tests ran against and the host's CA bundle.
RUN if [ -f /run/edge-build/constraints.txt ]; then \
      export PIP_CONSTRAINT=/run/edge-build/constraints.txt; fi \
 && if [ -f /run/edge-build/ca.crt ]; then export PIP_CERT=/run/edge-build/ca.crt; fi \
 && /opt/edge-node-services/bin/pip install . \
 && /opt/edge-node-services/bin/pip uninstall -y -q pip setuptools

# --- runtime: Debian's python3 and the storage tools the driver and the agent call.
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="edge-node-services" \
      org.opencontainers.image.description="LVM CSI driver, node resource manager and KMS plugin for edge Kubernetes nodes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# lvm2 (+ thin-provisioning-tools: thin_check for thin pools): LVM, also used through nsenter
# on the host; e2fsprogs/xfsprogs/btrfs-progs: mkfs, resize2fs, xfs_growfs, btrfs resize;
# util-linux + mount: blkid, wipefs, nsenter, mount/umount; cryptsetup-bin: encrypted volumes;
# libudev1: pyudev; ca-certificates: TLS to a cloud KMS.
# Left out: xfs_scrub (online XFS repair, never called) and the 36 MB Unicode library only it
# links, and manuals/docs as in Debian's slim images.
RUN printf '%s\n' 'path-exclude=/usr/sbin/xfs_scrub*' 'path-exclude=/usr/lib/*/xfs_scrub*' \
      'path-exclude=/usr/lib/*/libicu*' 'path-exclude=/usr/share/man/*' \
      'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
      > /etc/dpkg/dpkg.cfg.d/edge-node-services-slim \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 \
      lvm2 thin-provisioning-tools e2fsprogs xfsprogs btrfs-progs util-linux mount \
      cryptsetup-bin libudev1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/*
COPY --from=build /opt/edge-node-services /opt/edge-node-services
ENV PATH=/opt/edge-node-services/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN csi-lvm --version && node-resource-manager --version && kms-plugin --version
WORKDIR /
CMD ["kms-plugin", "--help"]
