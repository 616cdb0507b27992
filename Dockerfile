# syntax=docker/dockerfile:1
#
# One image for the three commands: csi-lvm, node-resource-manager, kms-plugin.
#   docker build -t ghcr.io/edge-node-services/edge-node-services:0.1.0 .
# The manifests in deploy/ set `command:`; the image has no entry point of its own.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for the project (the build hook generates the gRPC stubs from proto/)
# --- and for every dependency, so the runtime stage needs no compiler and no network index.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto/ proto/
COPY edge_proto/ edge_proto/
COPY edge_common/ edge_common/
COPY csi_lvm/ csi_lvm/
COPY node_resource_manager/ node_resource_manager/
COPY kms_plugin/ kms_plugin/
RUN pip wheel --wheel-dir /wheels .

# --- runtime: slim Debian with the storage tools the driver and the agent call.
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="edge-node-services" \
      org.opencontainers.image.description="LVM CSI driver, node resource manager and KMS plugin for edge Kubernetes nodes" \
      org.opencontainers.image.licenses="Apache-2.0"
# lvm2: LVM (also used through nsenter on the host); e2fsprogs/xfsprogs: mkfs, resize2fs,
# xfs_growfs; util-linux: blkid, wipefs, nsenter, lsblk, blockdev; mount: mount/umount;
# libudev1: pyudev; ca-certificates: TLS to a cloud KMS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      lvm2 e2fsprogs xfsprogs util-linux mount libudev1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels edge-node-services \
 && rm -rf /tmp/wheels \
 && csi-lvm --version && node-resource-manager --version && kms-plugin --version
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /
CMD ["kms-plugin", "--help"]
