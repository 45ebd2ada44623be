#!/bin/sh
# Checks the Prometheus alert rules: `promtool check rules` and `promtool test rules`.
# Installs promtool (Debian's prometheus package) when it is missing and this runs as root
# or with password-less sudo. Exit codes: 0 checked, 1 a check failed, 3 promtool is missing
# and cannot be installed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
rules="$here/prometheus/clusterclaw-alerts.yml"
tests="$here/prometheus/clusterclaw-alerts.test.yml"

if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root="sudo -n"
    else
        echo "promtool is missing and cannot be installed (not root, no password-less sudo)" >&2
        exit 3
    fi
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing promtool (Debian package prometheus)" >&2
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || true
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2 || true
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        echo "promtool is missing and could not be installed (apt-get install prometheus)" >&2
        exit 3
    fi
fi

promtool check rules "$rules"
cd "$here/prometheus"
promtool test rules "$(basename "$tests")"
