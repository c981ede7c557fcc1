#!/usr/bin/env bash
# Checks the web page as a person would: serves the repository on loopback,
# opens site/ in headless Chromium at desktop and phone widths, saves
# screenshots to site/screenshots/, and fails on any console error, failed
# request, broken in-page anchor or broken local link. Also checks that the
# code on the page matches the compiled examples.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 site/snippets.py --check

if ! command -v chromium >/dev/null 2>&1; then
    echo "--- installing chromium"
    .ci/apt-install.sh chromium
fi

tools=${XDG_CACHE_HOME:-$HOME/.cache}/rusty-genius-site-check
if [ ! -d "$tools/node_modules/playwright-core" ]; then
    echo "--- installing playwright-core (drives the system chromium; downloads no browser)"
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" playwright-core@1.64.1 >/dev/null
fi
# The tests also drive `genius serve` with Ollama's npm client from here.
if [ ! -d "$tools/node_modules/ollama" ]; then
    echo "--- installing the ollama npm client (for the server's tests)"
    npm install --silent --no-audit --no-fund --prefix "$tools" ollama@0.6.4 >/dev/null
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/site/')" 2>/dev/null && break
    sleep 0.1
done

mkdir -p site/screenshots
PLAYWRIGHT_CORE="$tools/node_modules/playwright-core" \
    node site/check.js "http://127.0.0.1:$port/site/index.html" site/screenshots
