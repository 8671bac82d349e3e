#!/bin/bash
# Build the cpu image for real where no registry serves base images, and run the demo in it as
# uid 10001 with a read-only root (docs/cluster.md, "The image"). Needs root, podman, runc and
# debootstrap from the Debian archive (apt-get install podman runc debootstrap).
#   deploy/box/build_image.sh [WORK]          (WORK: default /tmp/exaconnect-image)
# The base stands in for python:3.11-slim-bookworm: Debian bookworm (minbase) with python3.11 and
# python3-venv, made by debootstrap and imported with `podman import`. runc and explicit ulimits
# because crun here refuses cgroup v1 hybrid mode and a container without CAP_SYS_RESOURCE cannot
# raise RLIMIT_NPROC/NOFILE to podman's defaults.
set -eu
WORK=${1:-/tmp/exaconnect-image}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
BASE=localhost/debian-python:bookworm
IMAGE=localhost/exaconnect:0.1.0-cpu
PODMAN="podman --runtime runc"
LIMITS="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=4096:4096"
mkdir -p "$WORK"
if ! podman image exists "$BASE"; then
  [ -d "$WORK/rootfs" ] || debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian
  # this machine's CA bundle (pip reaches PyPI through the same TLS path as the host)
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$WORK/rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE"
fi
# shellcheck disable=SC2086  # flags are words
$PODMAN build --network host $LIMITS --build-arg FLAVOUR=cpu --build-arg PYTHON_IMAGE="$BASE" -t "$IMAGE" "$HERE"
mkdir -p "$WORK/data"
chmod 0777 "$WORK/data"
cat > "$WORK/data/demo-small.yaml" <<'EOF'
# configs/demo.yaml on a 48^3 sample (8 segmentation subvolumes), the demo FFN trained 60 steps
name: demo
output: /data/demo
queue_root: /data/queues
workers: 2
source: {image: synthetic, synthetic_shape: [48, 48, 48], synthetic_seed: 0}
ingest: {chunk_size: [16, 16, 16]}
misalign: {enabled: true, seed: 0, max_translation: 6.0, max_rotation_degrees: 0.5, max_elastic: 1.5, blank_sections: [20]}
align: {enabled: true}
segment: {model: demo, subvolume: [32, 32, 32], overlap: [8, 8, 8], demo_model_steps: 60, inference: {min_segment_size: 500}}
mesh: {shape: [32, 32, 32]}
skeletons: {shape: [32, 32, 32]}
link: {short: false}
EOF
# as the chart runs it: uid 10001, read-only root (podman gives --read-only a tmpfs /tmp), no network
# shellcheck disable=SC2086
$PODMAN run --rm --network none $LIMITS --read-only --user 10001:10001 -v "$WORK/data:/data" "$IMAGE" \
  run /data/demo-small.yaml
# shellcheck disable=SC2086
$PODMAN run --rm --network none $LIMITS --read-only --user 10001:10001 "$IMAGE" doctor
