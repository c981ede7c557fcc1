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
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverInfo" || true

export GENIUS_TEST_MODEL=${GENIUS_TEST_MODEL:-$(.ci/fetch-model.sh)}
export GENIUS_TEST_CHAT_MODEL=${GENIUS_TEST_CHAT_MODEL:-$(.ci/fetch-model.sh qwen)}
export GENIUS_TEST_EMBED_MODEL=${GENIUS_TEST_EMBED_MODEL:-$(.ci/fetch-model.sh minilm)}

started=$SECONDS
CARGO_TARGET_DIR=target/vulkan cargo test --release -p rusty-genius -p rusty-genius-cli \
    --features vulkan --test gpu --no-run --quiet
echo "vulkan build: $((SECONDS - started)) s"
gpu_tests() {
    CARGO_TARGET_DIR=target/vulkan cargo test --release -p rusty-genius -p rusty-genius-cli \
        --features vulkan --test gpu -- --nocapture --test-threads 1 "$@"
}
# Debian 12's lavapipe (Mesa 22.3) crashes now and then in the Qwen test
# (.ci/lavapipe.sh says how), so that test runs on Mesa 25's, fetched by
# .ci/lavapipe.sh. The others stay on the system's: Mesa 25 compiles
# llama.cpp's shaders with LLVM 15 so slowly (over 10 minutes for gemma's
# first request, cold) that it would not fit in CI's time.
started=$SECONDS
gpu_tests --skip qwen
echo "vulkan tests on the system's lavapipe: $((SECONDS - started)) s"
started=$SECONDS
qwen_driver=$(.ci/lavapipe.sh)
(
    export VK_DRIVER_FILES=$qwen_driver VK_ICD_FILENAMES=$qwen_driver
    vulkaninfo --summary 2>/dev/null | grep -E "driverInfo" || true
    gpu_tests qwen
)
echo "vulkan tests on $qwen_driver: $((SECONDS - started)) s"
CARGO_TARGET_DIR=target/vulkan cargo clippy --release -p rusty-genius -p rusty-genius-cli \
    --features vulkan --all-targets --quiet -- -D warnings
