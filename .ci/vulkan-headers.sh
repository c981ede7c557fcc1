#!/usr/bin/env bash
# Vulkan headers new enough for llama.cpp's Vulkan backend, for machines
# whose own are older (Debian 12 ships 1.3.239, which lacks
# VK_EXT_layer_settings, and ggml-vulkan.cpp then fails with
# "'LayerSettingEXT' is not a member of 'vk'"). Prints a folder to export
# as VULKAN_SDK before `cargo build --features vulkan`; CMake's FindVulkan
# takes the headers from there and links the system's libvulkan.
#
#   export VULKAN_SDK=$(.ci/vulkan-headers.sh)
#
# Where the system's headers already have it, that is /usr and nothing is
# fetched. Otherwise Debian 13's libvulkan-dev package is fetched by name
# with apt (from a private package list, leaving the system's sources
# alone), checked by apt against Debian's signed index, and unpacked under
# ~/.cache/rusty-genius-vulkan; nothing is installed. The other build needs
# are ordinary packages: glslc, spirv-headers, libvulkan-dev, and for
# running, a driver (mesa-vulkan-drivers has lavapipe, which runs on the
# CPU).
set -euo pipefail

SUITE=trixie
if grep -qs LayerSettingEXT /usr/include/vulkan/vulkan_structs.hpp; then
    echo /usr
    exit 0
fi
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-vulkan"
PREFIX="$CACHE/$SUITE/usr"
if grep -qs LayerSettingEXT "$PREFIX/include/vulkan/vulkan_structs.hpp"; then
    echo "$PREFIX"
    exit 0
fi
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$CACHE/$SUITE"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed=""
[ -f "$keyring" ] && signed="[signed-by=$keyring] "
echo "deb ${signed}http://deb.debian.org/debian $SUITE main" >"$APT/sources.list"
options=(
    -o "Dir::Etc::SourceList=$APT/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT"
    -o "Dir::Cache::archives=$APT/archives"
    -o "APT::Sandbox::User=root"
)
apt-get "${options[@]}" update -qq >&2
(cd "$APT/archives" && apt-get "${options[@]}" download -qq libvulkan-dev >&2)
dpkg-deb -x "$APT"/archives/libvulkan-dev_*.deb "$CACHE/$SUITE"
if ! grep -qs LayerSettingEXT "$PREFIX/include/vulkan/vulkan_structs.hpp"; then
    echo "the $SUITE headers lack VK_EXT_layer_settings too" >&2
    exit 1
fi
echo "$PREFIX"
