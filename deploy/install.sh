#!/bin/sh
# The one install procedure of the images, shared by the Dockerfile and deploy/exaconnect.def:
#   install.sh system-xpu      Level Zero GPU driver (Intel LTS 2350 = driver 803, what ITEX 2.15 was
#                              verified with) and Python 3 (3.10) on the Ubuntu 22.04 oneAPI runtime image;
#                              removes the build tools and SSH server that image ships
#   install.sh apt-sources     (part of system-xpu) Intel's GPU apt repository, unless one is configured
#                              already: the oneAPI runtime image has it with its own keyring, and apt
#                              refuses two entries for one source with different Signed-By values
#   install.sh deps LOCK       /opt/venv with exactly the pinned wheels of deploy/lock/FLAVOUR.txt
#   install.sh project SRC     exaconnect itself from the source folder SRC (no dependencies)
# tests/deploy/test_deploy.py resolves the same lock with the same wheel-only flags (pip --dry-run).
set -eu
VENV=${VENV:-/opt/venv}
PIP_LOCK_FLAGS="--no-cache-dir --no-deps --only-binary=:all:"
# Where apt's configuration and keyrings live (tests point them at a copy)
APT_ETC=${APT_ETC:-/etc/apt}
KEYRINGS=${KEYRINGS:-/usr/share/keyrings}
INTEL_GPU_REPO=https://repositories.intel.com/gpu/ubuntu
INTEL_GPU_SUITE="jammy/lts/2350 unified"
# In the oneAPI runtime image, not needed to run exaconnect (pip installs wheels only)
XPU_BASE_EXTRAS="build-essential cmake git openssh-server"

apt_sources() {
  if grep -Eqs "^[[:space:]]*deb[[:space:]].*${INTEL_GPU_REPO}/?[[:space:]]" "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list; then
    echo "install.sh: $INTEL_GPU_REPO is configured already; using it" >&2
    grep -Ehs "${INTEL_GPU_REPO}" "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list >&2
    return 0
  fi
  curl -fsSL https://repositories.intel.com/gpu/intel-graphics.key | gpg --yes --dearmor -o "$KEYRINGS/intel-graphics.gpg"
  echo "deb [arch=amd64 signed-by=$KEYRINGS/intel-graphics.gpg] $INTEL_GPU_REPO $INTEL_GPU_SUITE" \
    > "$APT_ETC/sources.list.d/intel-gpu-jammy.list"
}

remove_base_extras() {
  # shellcheck disable=SC2086  # a list of package names
  present=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' $XPU_BASE_EXTRAS 2>/dev/null | awk '$2 == "installed" {print $1}')
  [ -n "$present" ] || return 0
  # shellcheck disable=SC2086
  if apt-get -s purge $present | awk '/^Purg/ {print $2}' | grep -Eq '^(intel-|level-zero|libze|libigc|libigdgmm)'; then
    echo "install.sh: removing $present would take GPU runtime packages with it; keeping them" >&2
    return 0
  fi
  # shellcheck disable=SC2086
  apt-get purge -y $present
}

case "${1:-}" in
  system-xpu)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends ca-certificates curl gpg
    apt_sources
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv level-zero intel-level-zero-gpu intel-opencl-icd
    remove_base_extras
    apt-get purge -y curl gpg
    apt-get autoremove -y
    rm -rf /var/lib/apt/lists/*
    ;;
  apt-sources)
    apt_sources
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
    echo "usage: install.sh system-xpu | apt-sources | deps LOCKFILE | project SRC" >&2
    exit 2
    ;;
esac
