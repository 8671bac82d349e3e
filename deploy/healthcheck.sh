#!/bin/sh
# exaconnect-healthcheck [--if-present] [HEARTBEAT] [MAX_AGE_SECONDS]
# Healthy when the worker's heartbeat file (exaconnect queue work --heartbeat PATH, rewritten at
# least every 30 s) is younger than MAX_AGE_SECONDS (default 120). With --if-present a missing
# file is healthy too (the container runs something other than a worker).
if_present=0
if [ "${1:-}" = --if-present ]; then if_present=1; shift; fi
heartbeat=${1:-${EXACONNECT_HEARTBEAT:-/tmp/exaconnect/heartbeat}}
max_age=${2:-120}
if [ ! -e "$heartbeat" ]; then
  [ "$if_present" = 1 ] && exit 0
  echo "no heartbeat file $heartbeat" >&2
  exit 1
fi
age=$(( $(date +%s) - $(stat -c %Y "$heartbeat") ))
if [ "$age" -ge "$max_age" ]; then
  echo "heartbeat $heartbeat is ${age}s old (limit ${max_age}s)" >&2
  exit 1
fi
