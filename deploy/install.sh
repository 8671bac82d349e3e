#!/bin/sh
# The one install procedure of the images, shared by the Dockerfile and deploy/exaconnect.def:
#   install.sh system-xpu      Level Zero GPU driver (Intel LTS 2350 = driver 803, what ITEX 2.15 was
#                              verified with) and Python 3 (3.10) on the Ubuntu 22.04 oneAPI runtime image
#   install.sh deps LOCK       /opt/venv with exactly the pinned wheels of deploy/lock/FLAVOUR.txt
#   install.sh project SRC     exaconnect itself from the source folder SRC (no dependencies)
# tests/test_deploy.py resolves the same lock with the same wheel-only flags (pip --dry-run).
set -eu
VENV=${VENV:-/opt/venv}
PIP_LOCK_FLAGS="--no-cache-dir --no-deps --only-binary=:all:"

case "${1:-}" in
  system-xpu)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends ca-certificates curl gpg
    curl -fsSL https://repositories.intel.com/gpu/intel-graphics.key | gpg --yes --dearmor -o /usr/share/keyrings/intel-graphics.gpg
    echo "deb [arch=amd64 signed-by=/usr/share/keyrings/intel-graphics.gpg] https://repositories.intel.com/gpu/ubuntu jammy/lts/2350 unified" \
      > /etc/apt/sources.list.d/intel-gpu-jammy.list
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv level-zero intel-level-zero-gpu intel-opencl-icd
    apt-get purge -y curl gpg
    apt-get autoremove -y
    rm -rf /var/lib/apt/lists/*
    ;;
  deps)
    lock=${2:?install.sh deps LOCKFILE}
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086  # the flags are words
    "$VENV/bin/pip" install $PIP_LOCK_FLAGS --require-virtualenv -r "$lock"
    ;;
  project)
    src=${2:?install.sh project SRC}
    "$VENV/bin/pip" install --no-cache-dir --no-deps "$src"
    ;;
  *)
    echo "usage: install.sh system-xpu | deps LOCKFILE | project SRC" >&2
    exit 2
    ;;
esac
