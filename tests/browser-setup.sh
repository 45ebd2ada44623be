#!/usr/bin/env bash
# Makes this machine ready for the web console's browser test (tests/tests/console.rs):
# installs Debian's chromium and chromium-driver when missing, with apt-get (`apt-get update`
# once, then `apt-get install -y`). Idempotent. Run as root or with sudo available.
set -euo pipefail

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: ${missing[*]} missing and no apt-get to install them; install them by hand" >&2
  exit 1
fi
echo "installing ${missing[*]}"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
