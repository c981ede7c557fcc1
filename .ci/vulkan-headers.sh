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
# and unpacked under ~/.cache/rusty-genius-vulkan (.ci/apt-unpack.sh);
# nothing is installed. The other build needs are ordinary packages:
# glslc, spirv-headers, libvulkan-dev, and for running, a driver
# (mesa-vulkan-drivers has lavapipe, which runs on the CPU; on Debian 12
# see .ci/lavapipe.sh).
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
"$(dirname "$0")/apt-unpack.sh" "$SUITE" "$CACHE/$SUITE" libvulkan-dev
if ! grep -qs LayerSettingEXT "$PREFIX/include/vulkan/vulkan_structs.hpp"; then
    echo "the $SUITE headers lack VK_EXT_layer_settings too" >&2
    exit 1
fi
echo "$PREFIX"
