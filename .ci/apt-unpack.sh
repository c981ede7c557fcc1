#!/usr/bin/env bash
# Fetches Debian packages of another suite by name and unpacks them into a
# folder, installing nothing and leaving the system's package sources alone:
#
#   .ci/apt-unpack.sh SUITE FOLDER PACKAGE...
#
# apt reads a private package list (kept under FOLDER/apt) and checks what
# it downloads against Debian's signed index, as it does for an install.
# PACKAGE may name a release, as in mesa-vulkan-drivers/bookworm-backports.
set -euo pipefail

suite=$1
folder=$2
shift 2
apt="$folder/apt"
mkdir -p "$apt/lists/partial" "$apt/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed=""
[ -f "$keyring" ] && signed="[signed-by=$keyring] "
echo "deb ${signed}http://deb.debian.org/debian $suite main" >"$apt/sources.list"
options=(
    -o "Dir::Etc::SourceList=$apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt/lists"
    -o "Dir::Cache=$apt"
    -o "Dir::Cache::archives=$apt/archives"
    -o "APT::Sandbox::User=root"
)
apt-get "${options[@]}" update -qq >&2
rm -f "$apt"/archives/*.deb
(cd "$apt/archives" && apt-get "${options[@]}" download -qq "$@" >&2)
for package in "$apt"/archives/*.deb; do
    dpkg-deb -x "$package" "$folder"
done
