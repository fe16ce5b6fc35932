#!/usr/bin/env bash
# Makes sure Debian's redis-server is installed for the tests (the shared call limits, the Celery broker).
# The tests start and stop their own throwaway server on a free loopback port; this only installs the binary.
set -u
if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "redis-server missing: installing Debian's redis-server package for the tests"
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  # The package would start a system-wide server on port 6379 and leave it running: a policy-rc.d that
  # answers 101 ("action forbidden") keeps it from starting, for this install only.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
  fi
  ok=0
  if { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; } >"$log" 2>&1 \
      && command -v redis-server >/dev/null 2>&1; then
    ok=1
  fi
  [ -n "$policy" ] && rm -f "$policy"
  if [ "$ok" = "1" ]; then
    rm -f "$log"
    exit 0
  fi
  echo "apt-get output (last lines):" >&2
  tail -n 20 "$log" >&2
  rm -f "$log"
fi
cat >&2 <<'MSG'
######################################################################
# ERROR: redis-server could not be installed.                        #
# The shared-limits and CeleryExecutor tests need it (they fail      #
# without it). Install Debian's 'redis-server' package as root:      #
#   apt-get update && apt-get install -y redis-server                #
######################################################################
MSG
exit 1
