#!/usr/bin/env bash
# The `cuda` feature on an NVIDIA machine, in one command:
#
#   .ci/cuda-check.sh            build for the GPU nvidia-smi finds, run the
#                                GPU tests (every model on the GPU against the
#                                CPU, as CI does on lavapipe), then a short
#                                benchmark against llama.cpp's llama-bench
#                                built with CUDA from the same sources
#   .ci/cuda-check.sh --compile-only [ARCH]
#                                only compile and link `genius` with CUDA for
#                                one architecture (default 89), with nvcc and
#                                the libraries from PyPI when no toolkit is
#                                installed: for machines without a GPU
#
# Not part of CI (no NVIDIA GPU there). Uses its own target folder,
# target/cuda. A CUDA toolkit found on the machine (nvcc on PATH, or
# /usr/local/cuda) is used as it is; otherwise NVIDIA's CUDA 13 wheels
# (nvidia-cuda-nvcc, -runtime, -crt, -cccl, nvidia-nvvm, nvidia-cublas)
# are unpacked into ~/.cache/rusty-genius-cuda and used as the toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."

compile_only=false
arch=""
if [ "${1:-}" = "--compile-only" ]; then
    compile_only=true
    arch=${2:-89}
fi

# The toolkit: the machine's, or one made of PyPI wheels.
toolkit=""
if command -v nvcc >/dev/null; then
    toolkit=$(dirname "$(dirname "$(command -v nvcc)")")
elif [ -x /usr/local/cuda/bin/nvcc ]; then
    toolkit=/usr/local/cuda
else
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-cuda"
    toolkit="$cache/nvidia/cu13"
    if [ ! -x "$toolkit/bin/nvcc" ]; then
        echo "--- no CUDA toolkit here: unpacking NVIDIA's wheels from PyPI into $cache" >&2
        mkdir -p "$cache/wheels"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$cache/wheels" \
            nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl \
            nvidia-nvvm nvidia-cublas >&2
        for wheel in "$cache"/wheels/*.whl; do
            python3 -m zipfile -e "$wheel" "$cache"
        done
        chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/* 2>/dev/null || true
    fi
    # The wheels carry versioned shared libraries only; CMake and the
    # linker look for the plain names, and CMake for lib64.
    for lib in "$toolkit"/lib/lib*.so.*; do
        ln -sf "$(basename "$lib")" "$toolkit/lib/$(basename "$lib" | sed 's/\.so\..*/.so/')"
    done
    [ -e "$toolkit/lib64" ] || ln -s lib "$toolkit/lib64"
fi
echo "CUDA toolkit: $toolkit ($("$toolkit/bin/nvcc" --version | tail -1))" >&2
export PATH="$toolkit/bin:$PATH"
export CUDA_PATH="$toolkit" CUDAToolkit_ROOT="$toolkit"
export CMAKE_CUDA_COMPILER="$toolkit/bin/nvcc"
export LIBRARY_PATH="$toolkit/lib64:$toolkit/lib:${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$toolkit/lib64:$toolkit/lib:${LD_LIBRARY_PATH:-}"

if [ -z "$arch" ]; then
    # 8.9 -> 89, for the first GPU.
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi
export CMAKE_CUDA_ARCHITECTURES="$arch"
export CARGO_TARGET_DIR=target/cuda

started=$SECONDS
if $compile_only; then
    # No driver here: link against the runtime alone (no VMM pool, which
    # is what needs libcuda.so at link time), and as shared libraries,
    # since the wheels carry no static cuBLAS.
    export GGML_CUDA_NO_VMM=ON LLAMA_BUILD_SHARED_LIBS=1
    cargo build --release -p rusty-genius-cli --features cuda
    echo "compiled and linked genius for sm_$arch in $((SECONDS - started)) s: $CARGO_TARGET_DIR/release/genius" >&2
    exit 0
fi

export GENIUS_TEST_MODEL=${GENIUS_TEST_MODEL:-$(.ci/fetch-model.sh)}
export GENIUS_TEST_CHAT_MODEL=${GENIUS_TEST_CHAT_MODEL:-$(.ci/fetch-model.sh qwen)}
export GENIUS_TEST_EMBED_MODEL=${GENIUS_TEST_EMBED_MODEL:-$(.ci/fetch-model.sh minilm)}
cargo test --release -p rusty-genius -p rusty-genius-cli --features cuda --test gpu -- --nocapture --test-threads 1
echo "cuda build and tests: $((SECONDS - started)) s" >&2

echo "--- benchmark: generation and prompt tok/s, ours and llama-bench's, all layers on the GPU" >&2
for model in "$GENIUS_TEST_MODEL" "$GENIUS_TEST_CHAT_MODEL"; do
    cargo run --release --quiet -p rusty-genius --features cuda --example bench_generation -- "$model"
done
bench=$(LLAMA_PEER_CMAKE="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch" LLAMA_PEER_BUILD=cuda \
    .ci/build-llama-server.sh llama-bench)
for model in "$GENIUS_TEST_MODEL" "$GENIUS_TEST_CHAT_MODEL"; do
    "$bench" -m "$model" -ngl 99 -p 512 -n 128 -r 3
done
echo "--- 4 parallel requests, ours against llama-server with CUDA" >&2
server=$(LLAMA_PEER_CMAKE="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch" LLAMA_PEER_BUILD=cuda \
    .ci/build-llama-server.sh llama-server)
LLAMA_SERVER="$server" cargo run --release --quiet -p rusty-genius --features cuda \
    --example bench_parallel -- "$GENIUS_TEST_MODEL"
