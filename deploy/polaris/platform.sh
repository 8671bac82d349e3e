# shellcheck shell=bash
# shellcheck disable=SC2034  # read by deploy/lib.sh
# Polaris node: 1 AMD EPYC (32 cores), 4 NVIDIA A100 (one worker each); Lustre at /eagle.
ACCEL=${ACCEL:-nvidia}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
WORKERS_PER_NODE=${WORKERS_PER_NODE:-4}
# rank.sh gives local rank r GPU 3-r: the GPU closest to cores 8r..8r+7.
CPU_BIND_LIST=${CPU_BIND_LIST-0-7:8-15:16-23:24-31}
BINDS=${BINDS-/eagle}
# ALCF's Polaris recipe: ml use /soft/modulefiles; ml spack-pe-base; ml apptainer
MODULE_USE=${MODULE_USE-/soft/modulefiles}
MODULES=${MODULES-spack-pe-base apptainer}
# --fakeroot: ALCF runs Apptainer on Polaris always with it; --nv: NVIDIA driver libraries into the container
APPTAINER_FLAGS=${APPTAINER_FLAGS---fakeroot --nv}
SIF=${SIF:-exaconnect-nvidia.sif}
DEVICE=${DEVICE:-gpu}
TRAIN_DEVICE_HIERARCHY=
