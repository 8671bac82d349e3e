# shellcheck shell=bash
# shellcheck disable=SC2034  # read by deploy/lib.sh
# Aurora node: 2 sockets x 52 cores (0 and 52 left to the OS), 6 Intel Data Center GPU Max
# (2 tiles each = 12 workers); Lustre at /lus/flare; DAOS through dfuse.
ACCEL=${ACCEL:-xpu}
TILES_PER_GPU=${TILES_PER_GPU:-2}
WORKERS_PER_NODE=${WORKERS_PER_NODE:-12}
# 8 cores per tile: GPUs 0-2 (local ranks 0-5) on socket 0, GPUs 3-5 on socket 1.
CPU_BIND_LIST=${CPU_BIND_LIST-1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100}
BINDS=${BINDS-/lus/flare}
# `module use /soft/modulefiles` comes first: ALCF's modules for daos (and site tools) live there.
MODULE_USE=${MODULE_USE-/soft/modulefiles}
MODULES=${MODULES-apptainer}
APPTAINER_FLAGS=${APPTAINER_FLAGS-}          # /dev/dri is in the container by default
SIF=${SIF:-exaconnect-xpu.sif}
DEVICE=${DEVICE:-xpu}
TRAIN_DEVICE_HIERARCHY=FLAT                  # training: one process per node sees its 12 tiles
