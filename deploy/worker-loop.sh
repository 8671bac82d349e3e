#!/bin/bash
# One rank of a pipeline job (deploy/*/pipeline.pbs): until the runner has finished (it writes
# $EXA_STOP_FILE), drain every service queue under $QUEUE_ROOT in turn with one worker in the
# container, then poll again. SIGTERM is passed to the running worker (a second one releases its
# task) and ends the loop. WORKER_ARGS: more `queue work` options (e.g. --task-module LAB_TASKS).
# A file queue this node can see holding no task at all is skipped without starting the container:
# an idle pass then costs a directory listing, not a Python start-up per service and rank (on
# Lustre, thousands of ranks importing TensorFlow every POLL_SECONDS is a metadata storm).
set -euo pipefail
: "${SIF:?}" "${QUEUE_ROOT:?}" "${EXA_STOP_FILE:?}"
: "${SERVICES:?set by the pipeline job (exaconnect services: the services of every registered stage)}"
stopping=0
child=
on_term() {
  stopping=1
  if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap on_term TERM INT

queue_of() {
  case "$QUEUE_ROOT" in
    sqs://*|https://*|http://*) local root=${QUEUE_ROOT%/}; echo "${root%-}-$1" ;;
    *) echo "${QUEUE_ROOT%/}/$1" ;;
  esac
}

queue_is_empty() {  # true only when the queue is a file queue visible here with no task file
  local dir
  case "$1" in
    sqs://*|https://*|http://*) return 1 ;;
    fq://*) dir=${1#fq://} ;;
    *) dir=$1 ;;
  esac
  local root=${dir%/*}
  # the root not visible here (a path only the container sees): let the worker look
  [[ -d "$root" ]] || return 1
  # the queue not created yet: the runner has enqueued nothing for this service
  [[ -d "$dir/queue" ]] || return 0
  ! compgen -G "$dir/queue/*/*" >/dev/null
}

flags=()
if [[ -n "${APPTAINER_FLAGS:-}" ]]; then read -r -a flags <<< "$APPTAINER_FLAGS"; fi
if [[ -n "${EXA_BINDS:-}" ]]; then flags+=(--bind "$EXA_BINDS"); fi

while (( ! stopping )) && [[ ! -e "$EXA_STOP_FILE" ]]; do
  for service in $SERVICES; do
    (( stopping )) && break
    queue=$(queue_of "$service")
    if queue_is_empty "$queue"; then continue; fi
    worker=(exaconnect queue work "$queue" --processes 1 --exit-when-empty --create-queue
            --lease-seconds "${LEASE_SECONDS:-1800}" --max-attempts "${MAX_ATTEMPTS:-3}" --device "${DEVICE:-auto}")
    if [[ -n "${LEDGER_DIR:-}" ]]; then worker+=(--ledger-dir "$LEDGER_DIR/$service"); fi
    if [[ -n "${WORKER_ARGS:-}" ]]; then read -r -a extra <<< "$WORKER_ARGS"; worker+=("${extra[@]}"); fi
    apptainer exec "${flags[@]}" "$SIF" "${worker[@]}" &
    child=$!
    while :; do
      wait "$child" || true
      kill -0 "$child" 2>/dev/null || break
    done
    child=
  done
  if (( ! stopping )) && [[ ! -e "$EXA_STOP_FILE" ]]; then
    sleep "${POLL_SECONDS:-15}" &   # in the background, so SIGTERM ends the wait at once
    child=$!
    wait "$child" || true
    kill "$child" 2>/dev/null || true
    child=
  fi
done
