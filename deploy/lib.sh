# shellcheck shell=bash
# Shared by the PBS scripts under deploy/aurora and deploy/polaris (sourced, not run).
# A platform script sets its defaults (ACCEL, WORKERS_PER_NODE, CPU_BIND_LIST, BINDS, ...)
# then calls exa_setup and one of exa_launch_workers / exa_launch_per_node.
#
# Settings (environment, e.g. `qsub -v QUEUE=...,SIF=...`):
#   EXACONNECT_HOME  repository checkout holding deploy/ (default: the submit folder)
#   SIF              the Apptainer image (build: see README "On a cluster")
#   BINDS            comma-separated host paths bound into the container (Lustre)
#   DAOS_POOL, DAOS_CONT  mount this DAOS container with dfuse on every node and bind it
#   MODULES          modules to load (space-separated); MODULE_USE: folders for `module use`
#                    first (space-separated; also before `module load daos`)
#   WALLTIME         HH:MM:SS (default: the job's, from qstat); STOP_GRACE seconds before
#                    it the workers get SIGTERM (finish the task); RELEASE_GRACE seconds before
#                    it a second SIGTERM (give the task back to the queue); SIGKILL 5 s before it
#   LEDGER_DIR       failure ledgers outside the queues: LEDGER_DIR/SERVICE for each service
#   STALL_SECONDS    the pipeline job's runner stops a stage whose queue has not moved this long
#   WORKER_ARGS      more `exaconnect queue work` options (e.g. --task-module LAB_TASKS)
#   RUN_ARGS         more `exaconnect run` options for the pipeline job's runner (e.g. --forget
#                    segment to redo the segmentation, --set segment.subvolume=[128,128,128])
#   SERVICES         the services the pipeline job's ranks drain (default: `exaconnect services`
#                    in the image, which includes a lab's stages named in EXACONNECT_PLUGINS)

exa_die() { echo "exaconnect job: error: $*" >&2; exit 2; }
exa_log() { echo "exaconnect job: $*" >&2; }

exa_seconds() {  # HH:MM:SS or MM:SS or SS -> seconds
  local total=0 part
  local -a parts
  IFS=: read -r -a parts <<< "$1"
  for part in "${parts[@]}"; do total=$((total * 60 + 10#$part)); done
  echo "$total"
}

exa_setup() {
  cd "${PBS_O_WORKDIR:-.}" || exa_die "cannot cd to PBS_O_WORKDIR=${PBS_O_WORKDIR:-}"
  EXACONNECT_HOME=${EXACONNECT_HOME:-$PWD}
  [[ -x "$EXACONNECT_HOME/deploy/rank.sh" ]] || exa_die "EXACONNECT_HOME=$EXACONNECT_HOME has no deploy/rank.sh (submit from the repository, or set EXACONNECT_HOME)"
  [[ -n "${PBS_NODEFILE:-}" && -r "$PBS_NODEFILE" ]] || exa_die "PBS_NODEFILE is not set or not readable (run under qsub)"
  NNODES=$(sort -u "$PBS_NODEFILE" | wc -l)
  EXA_START=$(date +%s)

  if [[ -n "${MODULES:-}" || -n "${DAOS_POOL:-}" ]]; then
    if ! type module >/dev/null 2>&1 && [[ -r /usr/share/lmod/lmod/init/bash ]]; then
      # shellcheck disable=SC1091  # the site's Lmod
      . /usr/share/lmod/lmod/init/bash
    fi
  fi
  if [[ -n "${MODULES:-}" ]]; then
    type module >/dev/null 2>&1 || exa_die "MODULES=$MODULES but the module command is not available"
    exa_module_use
    local m
    for m in $MODULES; do module load "$m"; done
  fi
  command -v apptainer >/dev/null || exa_die "apptainer not found (module load apptainer)"
  [[ -f "$SIF" ]] || exa_die "SIF=$SIF does not exist (see README: On a cluster)"
  command -v mpiexec >/dev/null || exa_die "mpiexec not found"

  EXA_BINDS=${BINDS:-}
  if [[ -n "${DAOS_POOL:-}" || -n "${DAOS_CONT:-}" ]]; then
    [[ -n "${DAOS_POOL:-}" && -n "${DAOS_CONT:-}" ]] || exa_die "set both DAOS_POOL and DAOS_CONT"
    if type module >/dev/null 2>&1; then exa_module_use; module load daos; fi
    command -v launch-dfuse.sh >/dev/null || exa_die "launch-dfuse.sh not found (module use /soft/modulefiles; module load daos; and submit with qsub -l filesystems=flare:daos_user)"
    launch-dfuse.sh "${DAOS_POOL}:${DAOS_CONT}"   # mounts /tmp/POOL/CONT on every node of the job
    trap 'clean-dfuse.sh "${DAOS_POOL}:${DAOS_CONT}" || true' EXIT
    EXA_BINDS="${EXA_BINDS:+$EXA_BINDS,}/tmp/${DAOS_POOL}/${DAOS_CONT}"
  fi
  export ACCEL CPU_BIND_LIST TILES_PER_GPU GPUS_PER_NODE
}

EXA_MODULE_USED=
exa_module_use() {  # `module use` each folder of MODULE_USE, once
  [[ -z "$EXA_MODULE_USED" ]] || return 0
  EXA_MODULE_USED=1
  local folder
  for folder in ${MODULE_USE:-}; do module use "$folder"; done
}

exa_container() {  # the command line that runs "$@" inside the image
  local -a flags=()
  if [[ -n "${APPTAINER_FLAGS:-}" ]]; then read -r -a flags <<< "$APPTAINER_FLAGS"; fi
  EXA_CONTAINER=(apptainer exec "${flags[@]}")
  if [[ -n "$EXA_BINDS" ]]; then EXA_CONTAINER+=(--bind "$EXA_BINDS"); fi
  EXA_CONTAINER+=("$SIF" "$@")
}

exa_time_limit() {  # seconds the launcher may run before the workers are told to stop, or empty
  local walltime=${WALLTIME:-}
  if [[ -z "$walltime" && -n "${PBS_JOBID:-}" ]] && command -v qstat >/dev/null; then
    walltime=$(qstat -f "$PBS_JOBID" 2>/dev/null | sed -n 's/.*Resource_List.walltime = //p' | head -n 1)
  fi
  [[ -n "$walltime" ]] || return 0
  local left=$(( $(exa_seconds "$walltime") - ($(date +%s) - EXA_START) - ${STOP_GRACE:-300} ))
  if (( left < 60 )); then exa_log "warning: only ${left}s before STOP_GRACE=${STOP_GRACE:-300}s ahead of the walltime $walltime"; fi
  (( left > 1 )) || left=1
  echo "$left"
}

exa_watchdog() {  # exa_watchdog PID FIRST SECOND LAST: SIGTERM to PID after FIRST s (finish the
  # task), again SECOND s later (release it), SIGKILL LAST s after that; touches $EXA_STOPPED
  local pid=$1 nap=
  trap 'if [[ -n "$nap" ]]; then kill "$nap" 2>/dev/null; fi; exit 0' TERM
  exa_nap() { sleep "$1" >/dev/null 2>&1 & nap=$!; wait "$nap" || true; nap=; }
  exa_nap "$2"
  kill -0 "$pid" 2>/dev/null || return 0
  : > "$EXA_STOPPED"
  exa_log "walltime: SIGTERM to the workers (each finishes its task, then exits)"
  kill -TERM "$pid" 2>/dev/null || return 0
  exa_nap "$3"
  kill -0 "$pid" 2>/dev/null || return 0
  exa_log "walltime: second SIGTERM (the workers give their tasks back to the queue)"
  kill -TERM "$pid" 2>/dev/null || return 0
  exa_nap "$4"
  kill -0 "$pid" 2>/dev/null || return 0
  exa_log "walltime: SIGKILL (their leases run out by themselves)"
  kill -KILL "$pid" 2>/dev/null || true
}

exa_run() {  # runs "$@" (the launcher), stops it before the walltime, forwards SIGTERM/SIGINT
  local limit rc=0 watchdog=
  limit=$(exa_time_limit)
  EXA_STOPPED=$(mktemp "${TMPDIR:-/tmp}/exaconnect-stopped.XXXXXX")
  rm -f "$EXA_STOPPED"
  "$@" &
  EXA_LAUNCHER=$!
  if [[ -n "$limit" ]]; then
    local grace=${STOP_GRACE:-300} release=${RELEASE_GRACE:-60}
    (( release + 5 < grace )) || release=$(( grace / 2 ))
    local last=$(( release > 10 ? 5 : release / 2 ))
    exa_log "workers get SIGTERM after ${limit}s (STOP_GRACE=${grace}s before the walltime), a second one" \
            "$((grace - release))s later (RELEASE_GRACE=${release}s before it), SIGKILL $((release - last))s after that"
    exa_watchdog "$EXA_LAUNCHER" "$limit" "$((grace - release))" "$((release - last))" &
    watchdog=$!
  fi
  trap 'exa_log "SIGTERM: forwarding to the workers (a second one releases their tasks)"; kill -TERM "$EXA_LAUNCHER" 2>/dev/null || true' TERM
  trap 'kill -INT "$EXA_LAUNCHER" 2>/dev/null || true' INT
  while :; do
    wait "$EXA_LAUNCHER" && rc=0 || rc=$?
    kill -0 "$EXA_LAUNCHER" 2>/dev/null || break
  done
  trap - TERM INT
  if [[ -n "$watchdog" ]]; then kill -TERM "$watchdog" 2>/dev/null || true; wait "$watchdog" 2>/dev/null || true; fi
  if [[ -e "$EXA_STOPPED" ]]; then
    rm -f "$EXA_STOPPED"
    exa_log "stopped before the walltime; unfinished tasks stay on the queue (resubmit the job)"
    return 124
  fi
  return "$rc"
}

exa_mpiexec() {  # exa_mpiexec RANKS_PER_NODE COMMAND... : COMMAND on every rank, after rank.sh
  local ppn=$1
  shift
  local -a bind=()
  if [[ -n "${CPU_BIND_LIST:-}" ]]; then bind=(--cpu-bind "list:${CPU_BIND_LIST}"); fi
  exa_log "$NNODES node(s) x $ppn rank(s): $*"
  exa_run mpiexec -n "$((NNODES * ppn))" --ppn "$ppn" "${bind[@]}" "$EXACONNECT_HOME/deploy/rank.sh" "$@"
}

exa_launch() {  # exa_launch RANKS_PER_NODE COMMAND... : COMMAND in the container on every rank
  local ppn=$1
  shift
  exa_container "$@"
  exa_mpiexec "$ppn" "${EXA_CONTAINER[@]}"
}

exa_service_queue() {  # the queue of service $2 under queue root $1 (as services/runner.py names it)
  case "$1" in
    sqs://*|https://*|http://*) local root=${1%/}; echo "${root%-}-$2" ;;
    *) echo "${1%/}/$2" ;;
  esac
}

exa_queue_service() {  # the service a queue belongs to: $SERVICE, or the queue's last name part
  if [[ -n "${SERVICE:-}" ]]; then echo "$SERVICE"; return; fi
  local name=${1%/}
  name=${name##*/}
  case "$1" in
    sqs://*|https://*|http://*) name=${name##*-} ;;
  esac
  echo "$name"
}

exa_worker_args() {  # the worker's options for queue $1 (one process per rank)
  EXA_WORKER=(exaconnect queue work "$1" --processes 1 --lease-seconds "${LEASE_SECONDS:-1800}"
              --max-attempts "${MAX_ATTEMPTS:-3}" --create-queue --device "${DEVICE:-auto}")
  # one ledger per service, as the pipeline job and the Helm chart keep them (LEDGER_DIR/SERVICE)
  if [[ -n "${LEDGER_DIR:-}" ]]; then EXA_WORKER+=(--ledger-dir "${LEDGER_DIR%/}/$(exa_queue_service "$1")"); fi
  if [[ "${EXIT_WHEN_EMPTY:-1}" == 1 ]]; then EXA_WORKER+=(--exit-when-empty); fi
  if [[ -n "${WORKER_ARGS:-}" ]]; then
    local -a extra
    read -r -a extra <<< "$WORKER_ARGS"
    EXA_WORKER+=("${extra[@]}")
  fi
}

# ---------------------------------------------------------------- the three jobs

exa_workers_job() {  # one worker per accelerator on every node, all on $QUEUE
  : "${QUEUE:?set QUEUE=fq:///path/on/lustre/queues/SERVICE}"
  exa_setup
  exa_worker_args "$QUEUE"
  exa_launch "$WORKERS_PER_NODE" "${EXA_WORKER[@]}"
}

exa_services() {  # SERVICES, unless set: the registry's list (ours, and a lab's stages in EXACONNECT_PLUGINS)
  [[ -z "${SERVICES:-}" ]] || return 0
  exa_container exaconnect services
  SERVICES=$("${EXA_CONTAINER[@]}" | tr '\n' ' ') || exa_die "cannot list the services: ${EXA_CONTAINER[*]}"
  [[ -n "${SERVICES// /}" ]] || exa_die "exaconnect services printed no service (${EXA_CONTAINER[*]})"
}

exa_queue_root_here() {  # a file queue root that the nodes see: make it now, so that the ranks'
  # first pass finds it and skips the services with nothing queued (deploy/worker-loop.sh); best
  # effort: a root that only the container sees is left to the runner
  local dir
  case "$QUEUE_ROOT" in
    sqs://*|https://*|http://*) return 0 ;;
    fq://*) dir=${QUEUE_ROOT#fq://} ;;
    *) dir=$QUEUE_ROOT ;;
  esac
  [[ -d "$(dirname "$dir")" ]] && mkdir -p "$dir" 2>/dev/null || true
}

exa_pipeline_job() {  # the runner on the first node, workers for every service on every rank
  : "${PIPELINE:?set PIPELINE=path/to/pipeline.yaml}"
  : "${QUEUE_ROOT:?set QUEUE_ROOT=fq:///path/on/lustre/queues}"
  exa_setup
  exa_services
  EXA_STOP_FILE=${EXA_STOP_FILE:-$PWD/.exaconnect-pipeline-${PBS_JOBID:-$$}.done}
  rm -f "$EXA_STOP_FILE"
  local -a run=(exaconnect run "$PIPELINE" --queue-root "$QUEUE_ROOT" --workers 0
                --stall-seconds "${STALL_SECONDS:-7200}")
  if [[ -n "${LEDGER_DIR:-}" ]]; then run+=(--ledger-dir "$LEDGER_DIR"); fi
  if [[ -n "${OUTPUT:-}" ]]; then run+=(--output "$OUTPUT"); fi
  if [[ -n "${RUN_ARGS:-}" ]]; then
    local -a more
    read -r -a more <<< "$RUN_ARGS"
    run+=("${more[@]}")
  fi
  exa_queue_root_here
  exa_container "${run[@]}"
  exa_log "runner: ${EXA_CONTAINER[*]}"
  {
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM
    rc=0
    "${EXA_CONTAINER[@]}" &
    child=$!
    while :; do
      wait "$child" && rc=0 || rc=$?
      kill -0 "$child" 2>/dev/null || break
    done
    echo "$rc" > "$EXA_STOP_FILE"
  } &
  local runner=$! workers_rc=0
  export SIF EXA_BINDS APPTAINER_FLAGS QUEUE_ROOT SERVICES EXA_STOP_FILE LEASE_SECONDS MAX_ATTEMPTS LEDGER_DIR DEVICE \
    POLL_SECONDS WORKER_ARGS
  exa_mpiexec "$WORKERS_PER_NODE" "$EXACONNECT_HOME/deploy/worker-loop.sh" || workers_rc=$?
  if [[ ! -e "$EXA_STOP_FILE" ]]; then
    # the workers were stopped (walltime, qdel): the runner would wait for them forever; its
    # stages resume in the next job without redoing finished tasks
    exa_log "workers stopped before the runner finished (exit code $workers_rc): stopping the runner"
    kill -TERM "$runner" 2>/dev/null || true
  fi
  wait "$runner" || true
  local rc
  rc=$(cat "$EXA_STOP_FILE" 2>/dev/null || echo 1)
  rm -f "$EXA_STOP_FILE"
  exa_log "runner finished with exit code $rc"
  if (( workers_rc == 124 )); then
    exa_log "stopped before the walltime: resubmit the job to resume (finished stages and tasks are kept)"
    return 124
  fi
  return "$rc"
}

exa_train_job() {  # one training process per node (all its accelerators), TF_CONFIG from the node list
  : "${TRAIN_CONFIG:?set TRAIN_CONFIG=path/to/train.yaml}"
  ACCEL=none
  CPU_BIND_LIST=
  exa_setup
  EXACONNECT_NODES=$(awk '!seen[$0]++' "$PBS_NODEFILE" | paste -sd, -)
  export EXACONNECT_NODES TF_CONFIG_PORT=${TF_CONFIG_PORT:-29500}
  if [[ -n "${TRAIN_DEVICE_HIERARCHY:-}" ]]; then export ZE_FLAT_DEVICE_HIERARCHY=$TRAIN_DEVICE_HIERARCHY; fi
  exa_launch 1 python -m exaconnect.services.cluster with-tf-config -- \
    exaconnect train run --config "$TRAIN_CONFIG" --set training.strategy=multi_worker --set "training.device=${DEVICE:-auto}"
}
