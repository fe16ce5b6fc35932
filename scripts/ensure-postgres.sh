#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, pg_ctl) are installed for the state-store tests.
# The tests start and stop their own throwaway server; this only installs the binaries.
set -u
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL server binaries missing: installing Debian's postgresql package for the tests"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; then
    exit 0
  fi
fi
cat >&2 <<'MSG'
######################################################################
# WARNING: PostgreSQL server binaries could not be installed.        #
# The PostgreSQL state-store tests will be SKIPPED in this run.      #
# Install Debian's 'postgresql' package (or put initdb on PATH).     #
######################################################################
MSG
exit 0
