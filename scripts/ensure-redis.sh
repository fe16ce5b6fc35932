#!/usr/bin/env bash
# Makes sure Debian's redis-server is installed for the tests (the shared call limits, the Celery broker).
# The tests start and stop their own throwaway server on a free loopback port; this only installs the binary.
set -u
. "$(dirname "$0")/lib/apt-install.sh"
ensure_debian_package redis-server "the shared-limits and CeleryExecutor tests" redis-server
