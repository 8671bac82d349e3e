#!/bin/bash
# One rank of a pipeline job (deploy/*/pipeline.pbs): until the runner has finished (it writes
# $EXA_STOP_FILE), drain every service queue under $QUEUE_ROOT in turn with one worker in the
# container, then poll again. SIGTERM is passed to the running worker (a second one releases its
# task) and ends the loop. WORKER_ARGS: more `queue work` options (e.g. --task-module LAB_TASKS).
set -euo pipefail
: "${SIF:?}" "${QUEUE_ROOT:?}" "${EXA_STOP_FILE:?}"
: "${SERVICES:?set by the pipeline job (exaconnect services: every registered stage's service)}"
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

flags=()
if [[ -n "${APPTAINER_FLAGS:-}" ]]; then read -r -a flags <<< "$APPTAINER_FLAGS"; fi
if [[ -n "${EXA_BINDS:-}" ]]; then flags+=(--bind "$EXA_BINDS"); fi

while (( ! stopping )) && [[ ! -e "$EXA_STOP_FILE" ]]; do
  for service in $SERVICES; do
    (( stopping )) && break
    worker=(exaconnect queue work "$(queue_of "$service")" --processes 1 --exit-when-empty --create-queue
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
