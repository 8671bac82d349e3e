#!/bin/bash
# Submits a pipeline run as PBS jobs: optionally a multi-node training job first, then the
# pipeline job (runner + workers on every tile/GPU) with `-W depend=afterok:TRAIN_JOB`, so the
# pipeline starts only if training succeeded. Prints the job ids.
#
#   deploy/submit.sh PIPELINE.yaml --queue-root fq:///lus/flare/projects/PROJ/queues \
#       --sif /lus/flare/projects/PROJ/exaconnect-xpu.sif --account PROJ [--nodes 8] [--walltime 06:00:00]
#       [--train TRAIN.yaml --train-nodes 4 --train-walltime 06:00:00] [--platform aurora|polaris]
#       [--ledger-dir /lus/.../ledger] [--queue prod] [-l RESOURCE ...] [--dry-run]
#   -l RESOURCE goes to every qsub (repeatable), e.g. -l filesystems=flare:daos_user for DAOS.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "submit.sh: error: $*" >&2; exit 2; }

platform=aurora nodes=2 walltime=06:00:00 train="" train_nodes=2 train_walltime=06:00:00
account=${PBS_ACCOUNT:-} pbs_queue=prod queue_root="" sif="" ledger_dir="" dry_run=0 pipeline=""
resources=()
while (( $# )); do
  case "$1" in
    --platform) platform=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --walltime) walltime=$2; shift 2 ;;
    --train) train=$2; shift 2 ;;
    --train-nodes) train_nodes=$2; shift 2 ;;
    --train-walltime) train_walltime=$2; shift 2 ;;
    --account|-A) account=$2; shift 2 ;;
    --queue|-q) pbs_queue=$2; shift 2 ;;
    --queue-root) queue_root=$2; shift 2 ;;
    --sif) sif=$2; shift 2 ;;
    --ledger-dir) ledger_dir=$2; shift 2 ;;
    -l) [[ $# -ge 2 && "$2" == *=* ]] || die "-l needs RESOURCE=VALUE (e.g. -l filesystems=flare:daos_user)"
        resources+=(-l "$2"); shift 2 ;;
    -l*=*) resources+=(-l "${1#-l}"); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    -*) die "unknown option $1" ;;
    *) [[ -z "$pipeline" ]] || die "one PIPELINE.yaml only"; pipeline=$1; shift ;;
  esac
done
[[ -n "$pipeline" ]] || usage
[[ -f "$pipeline" ]] || die "pipeline file $pipeline does not exist"
[[ -n "$queue_root" ]] || die "--queue-root is required (a folder on the shared filesystem, or an SQS prefix)"
[[ -n "$sif" ]] || die "--sif is required (the Apptainer image on the shared filesystem)"
[[ -n "$account" ]] || die "--account is required (or set PBS_ACCOUNT)"
home=$(cd "$(dirname "$0")/.." && pwd)
[[ -f "$home/deploy/$platform/pipeline.pbs" ]] || die "--platform $platform: no deploy/$platform/pipeline.pbs"
[[ -z "$train" || -f "$train" ]] || die "training config $train does not exist"

submit() {  # submit NAME QSUB-ARGS... ; prints the job id
  if (( dry_run )); then
    echo "qsub $*" >&2
    echo "DRYRUN-$1"
    return
  fi
  shift
  qsub "$@"
}

common=(-A "$account" -q "$pbs_queue" "${resources[@]}")
vars="EXACONNECT_HOME=$home,SIF=$sif"
if [[ -n "$ledger_dir" ]]; then vars="$vars,LEDGER_DIR=$ledger_dir"; fi
depend=()
if [[ -n "$train" ]]; then
  train_job=$(submit train "${common[@]}" -N exa-train -l "select=$train_nodes" -l "walltime=$train_walltime" \
    -v "$vars,TRAIN_CONFIG=$(realpath "$train")" "$home/deploy/$platform/train.pbs")
  echo "train job: $train_job"
  depend=(-W "depend=afterok:$train_job")
fi
pipeline_job=$(submit pipeline "${common[@]}" "${depend[@]}" -N exa-pipeline -l "select=$nodes" -l "walltime=$walltime" \
  -v "$vars,PIPELINE=$(realpath "$pipeline"),QUEUE_ROOT=$queue_root" "$home/deploy/$platform/pipeline.pbs")
echo "pipeline job: $pipeline_job"
