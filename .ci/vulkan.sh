#!/usr/bin/env bash
# The `vulkan` feature, built and tested as CI does it: on lavapipe, Mesa's
# Vulkan driver that runs on the CPU (a real Vulkan device, with device
# memory, shaders and transfers, only slow). Every model of the test suite
# is loaded with all its layers on the device and with none, and each
# answer compared (crates/genius/tests/gpu.rs), and `genius` is run with
# and without the driver (crates/cli/tests/gpu.rs).
#
# The build has its own target folder, so the CPU build stays warm. Needs
# the test models in GENIUS_TEST_MODEL, GENIUS_TEST_CHAT_MODEL and
# GENIUS_TEST_EMBED_MODEL, or fetches them.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(mesa-vulkan-drivers glslc spirv-headers libvulkan-dev vulkan-tools)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "--- installing ${missing[*]}"
    .ci/apt-install.sh "${missing[@]}"
fi

VULKAN_SDK=$(.ci/vulkan-headers.sh)
export VULKAN_SDK
echo "Vulkan headers from $VULKAN_SDK"
# ggml skips Vulkan devices of the CPU type unless they are named.
export GGML_VK_VISIBLE_DEVICES=0
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" || true

export GENIUS_TEST_MODEL=${GENIUS_TEST_MODEL:-$(.ci/fetch-model.sh)}
export GENIUS_TEST_CHAT_MODEL=${GENIUS_TEST_CHAT_MODEL:-$(.ci/fetch-model.sh qwen)}
export GENIUS_TEST_EMBED_MODEL=${GENIUS_TEST_EMBED_MODEL:-$(.ci/fetch-model.sh minilm)}

started=$SECONDS
CARGO_TARGET_DIR=target/vulkan cargo test --release -p rusty-genius -p rusty-genius-cli \
    --features vulkan --test gpu --no-run --quiet
echo "vulkan build: $((SECONDS - started)) s"
started=$SECONDS
CARGO_TARGET_DIR=target/vulkan cargo test --release -p rusty-genius -p rusty-genius-cli \
    --features vulkan --test gpu -- --nocapture --test-threads 1
echo "vulkan tests: $((SECONDS - started)) s"
CARGO_TARGET_DIR=target/vulkan cargo clippy --release -p rusty-genius -p rusty-genius-cli \
    --features vulkan --all-targets --quiet -- -D warnings
