# Sourced by the ensure-*.sh scripts: install Debian packages for the tests when a binary is missing.
#   ensure_debian_package BINARY WHY PACKAGE...
# Exits 0 when BINARY (a path or a command name) is there or got installed; otherwise prints apt-get's last
# lines and what to run by hand, and exits 1 (the tests that need it cannot pass without it). CI runs as root
# with no network but the package registries. Services a package would start system-wide (redis-server on 6379)
# are kept from starting: a policy-rc.d answering 101 ("action forbidden"), for this install only.

_have() { [ -x "$1" ] || command -v "$1" >/dev/null 2>&1; }

ensure_debian_package() {
  local binary=$1 why=$2
  shift 2
  _have "$binary" && exit 0
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "$binary missing: installing Debian's $* for $why"
    export DEBIAN_FRONTEND=noninteractive
    local log policy="" ok=0
    log=$(mktemp)
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    fi
    if { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1 \
        && _have "$binary"; then
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
  {
    echo "######################################################################"
    echo "# ERROR: $binary could not be installed."
    echo "# $why needs it (those tests fail without it)."
    echo "# Install it as root:  apt-get update && apt-get install -y $*"
    echo "######################################################################"
  } >&2
  exit 1
}
