#!/usr/bin/env bash
# The default build must hold no code of llama.cpp's AMX backend, which
# crashes on Intel Xeons that report AMX (see .cargo/config.toml). Two
# checks, so that the proof does not depend on the CPU of the CI machine:
#
# 1. By construction: compile llama.cpp's AMX sources for a Sapphire Rapids
#    target, once without and once with the flags the workspace adds. Without
#    them they must contain AMX instructions (else this check proves nothing);
#    with them, none.
# 2. The binaries given as arguments hold no AMX symbol or instruction.
set -euo pipefail
cd "$(dirname "$0")/.."

flags=$(sed -n 's/^CXXFLAGS_x86_64_unknown_linux_gnu = "\(.*\)"$/\1/p' .cargo/config.toml)
if [ -z "$flags" ]; then
    echo "check-no-amx: no CXXFLAGS_x86_64_unknown_linux_gnu in .cargo/config.toml" >&2
    exit 1
fi
sources=$(cargo metadata --format-version 1 --locked | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
(pkg,) = [p for p in meta["packages"] if p["name"] == "llama-cpp-sys-2"]
print(os.path.join(os.path.dirname(pkg["manifest_path"]), "llama.cpp", "ggml"))
')
amx_instructions='\s(tileloadd|tileloaddt1|tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|tdpfp16ps|tilezero|tilestored|ldtilecfg|sttilecfg|tilerelease)\b'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

count_amx() {
    # $1: extra flags. Prints AMX instructions + AMX backend symbols.
    local total=0
    for unit in amx/amx.cpp amx/mmq.cpp; do
        # shellcheck disable=SC2086
        c++ -std=c++17 -O2 $1 -march=sapphirerapids -fopenmp \
            -I"$sources/include" -I"$sources/src" -I"$sources/src/ggml-cpu" \
            -c "$sources/src/ggml-cpu/$unit" -o "$work/unit.o"
        local found
        found=$(( $(objdump -d --no-show-raw-insn "$work/unit.o" | grep -cE "$amx_instructions" || true) \
                + $(nm -C "$work/unit.o" | grep -c ggml_backend_amx || true) ))
        total=$((total + found))
    done
    echo "$total"
}

without=$(count_amx "")
with=$(count_amx "$flags")
echo "AMX sources for -march=sapphirerapids: $without AMX instructions and symbols without [$flags], $with with them"
if [ "$without" -eq 0 ]; then
    echo "check-no-amx: the control build has no AMX code; the check would prove nothing" >&2
    exit 1
fi
if [ "$with" -ne 0 ]; then
    echo "check-no-amx: the workspace's flags leave AMX code in llama.cpp" >&2
    exit 1
fi

for binary in "$@"; do
    symbols=$(nm -C "$binary" | grep -c ggml_backend_amx || true)
    instructions=$(objdump -d --no-show-raw-insn "$binary" | grep -cE "$amx_instructions" || true)
    echo "$binary: $symbols AMX backend symbols, $instructions AMX instructions"
    if [ "$symbols" -ne 0 ] || [ "$instructions" -ne 0 ]; then
        echo "check-no-amx: $binary holds AMX code" >&2
        exit 1
    fi
done
