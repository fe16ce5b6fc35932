#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed for the operator console's browser tests (Playwright drives
# /usr/bin/chromium; it never downloads its own browser, the CI machine has no network beyond package registries).
set -u
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Chromium missing: installing Debian's chromium package for the console's browser tests"
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation; } \
      >"$log" 2>&1 && [ -x "$CHROMIUM" ]; then
    rm -f "$log"
    exit 0
  fi
  echo "apt-get output (last lines):" >&2
  tail -n 20 "$log" >&2
  rm -f "$log"
fi
cat >&2 <<'MSG'
######################################################################
# ERROR: Chromium could not be installed at /usr/bin/chromium.       #
# The console's browser tests need it (they fail without it).        #
# Install Debian's 'chromium' package as root:                       #
#   apt-get update && apt-get install -y chromium                    #
######################################################################
MSG
exit 1
