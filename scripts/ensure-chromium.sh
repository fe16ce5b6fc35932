#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed for the operator console's browser tests (Playwright drives
# /usr/bin/chromium; it never downloads its own browser, the CI machine has no network beyond package registries).
set -u
. "$(dirname "$0")/lib/apt-install.sh"
ensure_debian_package /usr/bin/chromium "the console's browser tests" chromium fonts-liberation
