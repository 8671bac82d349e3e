#!/bin/sh
# exaconnect-healthcheck [--if-present] [HEARTBEAT] [MAX_AGE_SECONDS] [PROGRESS_LIMIT_SECONDS]
# The worker's liveness probe (the image's HEALTHCHECK, the Helm chart's livenessProbe) on its
# heartbeat file (exaconnect queue work --heartbeat PATH): one JSON object
#   {"time": ..., "pid": ..., "task": ID|null, "task_started": ...|null, "progress": ..., "task_timeout": ...|null}
# rewritten by the worker's task loop at every step and by its lease keeper every 10 s. Unhealthy:
#   - the file is MAX_AGE_SECONDS old (default 120): the worker and its keeper are gone or frozen;
#   - its task has run past its task_timeout plus TIMEOUT_GRACE seconds (default 30;
#     $EXACONNECT_TIMEOUT_GRACE): the keeper should have ended it by then, so the worker is wedged;
#   - progress (the task loop's last lease, finish or poll) is older than PROGRESS_LIMIT_SECONDS
#     (default: no limit): stuck inside a task without a time limit, or in the queue itself.
# With --if-present a missing file is healthy (the container runs something other than a worker).
# A file holding only a time stamp (older workers) is checked for its age alone.
if_present=0
if [ "${1:-}" = --if-present ]; then if_present=1; shift; fi
heartbeat=${1:-${EXACONNECT_HEARTBEAT:-/tmp/exaconnect/heartbeat}}
max_age=${2:-120}
progress_limit=${3:-0}
timeout_grace=${EXACONNECT_TIMEOUT_GRACE:-30}
if [ ! -e "$heartbeat" ]; then
  [ "$if_present" = 1 ] && exit 0
  echo "no heartbeat file $heartbeat" >&2
  exit 1
fi
now=$(date +%s)
age=$(( now - $(stat -c %Y "$heartbeat") ))
if [ "$age" -ge "$max_age" ]; then
  echo "heartbeat $heartbeat is ${age}s old (limit ${max_age}s)" >&2
  exit 1
fi
record=$(head -c 4096 "$heartbeat")
field() {  # the whole seconds of a number field, the text of a string field, empty for null/absent
  printf '%s' "$record" | sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",}.]*\).*/\1/p" | sed 's/^null$//'
}
task=$(field task)
started=$(field task_started)
timeout=$(field task_timeout)
progress=$(field progress)
pid=$(field pid)
if [ -n "$task" ] && [ -n "$started" ] && [ -n "$timeout" ]; then
  ran=$(( now - started ))
  if [ "$ran" -gt $(( timeout + timeout_grace )) ]; then
    echo "worker $pid: task $task has run ${ran}s, past its task timeout ${timeout}s (+${timeout_grace}s)" >&2
    exit 1
  fi
fi
if [ "$progress_limit" -gt 0 ] && [ -n "$progress" ]; then
  still=$(( now - progress ))
  if [ "$still" -ge "$progress_limit" ]; then
    echo "worker $pid: no progress for ${still}s (limit ${progress_limit}s)${task:+, running task $task}" >&2
    exit 1
  fi
fi
exit 0
