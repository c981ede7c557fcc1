#!/usr/bin/env bash
# Installs Debian packages. A machine can arrive with dpkg half-way through
# an upgrade (seen: perl-base upgraded, perl-modules not), and then every
# `apt-get install` stops at "Unmet dependencies"; finish that first and
# try once more.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! apt-get install -y -qq "$@" >/dev/null; then
    echo "--- apt-get refused; finishing the machine's interrupted install first"
    dpkg --configure -a
    apt-get --fix-broken install -y -qq >/dev/null
    apt-get install -y -qq "$@" >/dev/null
fi
