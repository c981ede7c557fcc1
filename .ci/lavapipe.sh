#!/usr/bin/env bash
# A lavapipe (Mesa's Vulkan driver on the CPU) that runs llama.cpp's Vulkan
# backend without crashing. Prints the driver's ICD file, to export as
# VK_DRIVER_FILES (and VK_ICD_FILENAMES, for older Vulkan loaders):
#
#   icd=$(.ci/lavapipe.sh) && export VK_DRIVER_FILES=$icd VK_ICD_FILENAMES=$icd
#
# Debian 12's lavapipe (Mesa 22.3.6) dies with SIGSEGV in about one run in
# three of the Qwen test in crates/genius/tests/gpu.rs: in the driver's
# submit thread, calling through an object that is no longer there, while
# ggml waits for its fence. Traced, the only buffer ggml destroys while
# generating is a scratch buffer it outgrew mid-graph (after waiting for
# the queue, as Vulkan asks); with a debugger pausing at that destroy, six
# runs in six passed: most likely a race inside the driver. Mesa 25.0 from
# bookworm-backports ran the same test without a crash, and is built for
# Debian 12's own LLVM 15 and C library, so its driver is fetched by name
# and unpacked under ~/.cache/rusty-genius-vulkan (.ci/apt-unpack.sh);
# nothing is installed. It is slow to start: it compiles llama.cpp's shaders
# with LLVM 15 for minutes (about 7 for Qwen's, more than 10 for gemma's
# first request) before caching them. Where the system's Mesa is 23 or
# newer, its own ICD file is printed.
set -euo pipefail

system_icd=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
[ -f "$system_icd" ] || system_icd=/usr/share/vulkan/icd.d/lvp_icd.json
version=$(dpkg-query -W -f '${Version}' mesa-vulkan-drivers 2>/dev/null || true)
if [ -f "$system_icd" ] && dpkg --compare-versions "${version:-0}" ge 23; then
    echo "$system_icd"
    exit 0
fi
SUITE=bookworm-backports
FOLDER="${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-vulkan/$SUITE"
icd="$FOLDER/lvp_icd.json"
if ! compgen -G "$FOLDER/usr/lib/*/libvulkan_lvp.so" >/dev/null; then
    "$(dirname "$0")/apt-unpack.sh" "$SUITE" "$FOLDER" "mesa-vulkan-drivers/$SUITE"
fi
library=$(compgen -G "$FOLDER/usr/lib/*/libvulkan_lvp.so" | head -1)
# The package's ICD file names the library without a folder; this one
# points at the unpacked copy.
sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$library\"#" \
    "$FOLDER/usr/share/vulkan/icd.d/lvp_icd.json" >"$icd"
echo "$icd"
