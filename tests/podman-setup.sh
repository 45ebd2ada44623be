#!/usr/bin/env bash
# Makes this machine ready for the Podman end-to-end test (tests/tests/podman.rs):
# - installs podman and catatonit (the init process Podman runs for `HostConfig.Init`) when
#   missing, with apt-get (`apt-get update` once, then `apt-get install -y`);
# - where the engine may not raise resource limits (no CAP_SYS_RESOURCE in this process's
#   bounding set, as in many CI containers), sets `default_ulimits = []` in the [containers]
#   section of /etc/containers/containers.conf, else every container fails to start.
# Idempotent. Run as root or with sudo available.
set -euo pipefail

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null 2>&1 || missing+=(catatonit)
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: ${missing[*]} missing and no apt-get to install them; install them by hand" >&2
    exit 1
  fi
  echo "installing ${missing[*]}"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
fi

conf=/etc/containers/containers.conf
capbnd=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
# CAP_SYS_RESOURCE is capability 24.
if (( (16#${capbnd:-0} >> 24) & 1 )); then
  exit 0
fi
if [ -f "$conf" ] && grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=' "$conf"; then
  exit 0
fi
echo "no CAP_SYS_RESOURCE here: setting default_ulimits = [] in $conf"
$sudo mkdir -p "$(dirname "$conf")"
if [ -f "$conf" ] && grep -Eq '^[[:space:]]*\[containers\]' "$conf"; then
  $sudo sed -i -E '0,/^[[:space:]]*\[containers\]/s//[containers]\ndefault_ulimits = []/' "$conf"
else
  printf '[containers]\ndefault_ulimits = []\n' | $sudo tee -a "$conf" >/dev/null
fi
