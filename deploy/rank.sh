#!/bin/bash
# Per-rank set-up, run by mpiexec on every rank before the container starts:
#   mpiexec ... deploy/rank.sh apptainer exec ... exaconnect queue work QUEUE ...
# Pins the rank to one accelerator from its local rank and exports its CPU range and
# thread counts, then execs the command (so signals reach it directly).
#   ACCEL=xpu     Intel GPUs (Aurora): ZE_AFFINITY_MASK=GPU.TILE, TILES_PER_GPU tiles each
#   ACCEL=nvidia  NVIDIA GPUs (Polaris): CUDA_VISIBLE_DEVICES, GPU = GPUS_PER_NODE-1-local rank
#                 (Polaris' GPU 0 sits next to the last cores)
#   ACCEL=none    CPU only
#   CPU_BIND_LIST the colon-separated ranges given to `mpiexec --cpu-bind list:...`; the
#                 rank's entry becomes EXACONNECT_CPUS and its size the thread count.
set -euo pipefail

local_rank=${PALS_LOCAL_RANKID:-${PMI_LOCAL_RANK:-${MPI_LOCALRANKID:-${OMPI_COMM_WORLD_LOCAL_RANK:-}}}}
if [[ -z "$local_rank" ]]; then
  echo "rank.sh: no local rank (PALS_LOCAL_RANKID, PMI_LOCAL_RANK, MPI_LOCALRANKID or OMPI_COMM_WORLD_LOCAL_RANK)" >&2
  exit 2
fi

case "${ACCEL:-none}" in
  xpu)
    tiles=${TILES_PER_GPU:-2}
    export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE   # GPU.TILE masks address one tile of one GPU
    export ZE_AFFINITY_MASK="$((local_rank / tiles)).$((local_rank % tiles))"
    ;;
  nvidia)
    gpus=${GPUS_PER_NODE:-4}
    export CUDA_VISIBLE_DEVICES="$((gpus - 1 - local_rank % gpus))"
    ;;
  none) ;;
  *) echo "rank.sh: ACCEL=${ACCEL} (expected xpu, nvidia or none)" >&2; exit 2 ;;
esac

if [[ -n "${CPU_BIND_LIST:-}" ]]; then
  IFS=: read -r -a ranges <<< "$CPU_BIND_LIST"
  if (( local_rank >= ${#ranges[@]} )); then
    echo "rank.sh: local rank $local_rank but CPU_BIND_LIST has ${#ranges[@]} ranges" >&2
    exit 2
  fi
  EXACONNECT_CPUS=${ranges[$local_rank]}
  first=${EXACONNECT_CPUS%%-*}
  last=${EXACONNECT_CPUS##*-}
  threads=$((last - first + 1))
  export EXACONNECT_CPUS OMP_NUM_THREADS=$threads TF_NUM_INTRAOP_THREADS=$threads TF_NUM_INTEROP_THREADS=1
fi

exec "$@"
