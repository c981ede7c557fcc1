"""Conversations taking turns on fewer slots than there are of them:
`genius serve` (its RAM tier) against llama-server (`--cache-ram`), in one
run, on the same model, threads, slots and context.

    LLAMA_SERVER=$(.ci/build-llama-server.sh) python3 crates/cli/benches/kv_ram_tier.py \
        target/release/genius <chat-model.gguf> [rounds]

Each server gets `--parallel 4`. Eight conversations, each with a system
prompt of its own (~400 tokens), answer a first turn, then take turns for
`rounds` rounds: every turn finds its slot taken by another conversation,
so only a cache kept out of the slots spares decoding the conversation
again. The baseline is a warm slot: four conversations taking turns, each
finding its own slot. Printed: median time to first token of each, their
ratio (the issue asks at most 1.5), and the tokens each turn decoded.
`GENIUS_ARGS="--cache-ram 0"` shows what the turns cost without the tier.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

THREADS = "2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc):
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit("the server never became healthy")


def system_prompt(c):
    facts = " ".join(
        f"Fact {i} of archive {c}: shelf {i * 7 % 13} holds {['maps', 'letters', 'coins', 'seeds'][i % 4]} from year {1800 + i * c}."
        for i in range(24)
    )
    return f"You are the archivist of archive {c}. Answer in one short sentence. {facts}"


def turn(port, model, messages):
    """Streams one chat turn; returns (seconds to first token, answer, cached tokens)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    started = time.time()
    first, answer, cached, prompt = None, "", None, None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.time() - started
                    answer += text
            usage = chunk.get("usage")
            if usage:
                prompt = usage.get("prompt_tokens")
                details = usage.get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens", cached)
            timings = chunk.get("timings")
            if timings and "cache_n" in timings:
                cached = timings["cache_n"]
                prompt = timings.get("cache_n", 0) + timings.get("prompt_n", 0)
    return first, answer, cached, prompt


def play(port, model, conversations, rounds):
    """First turns, then `rounds` rounds of turns; the TTFTs and decoded counts of the rounds."""
    histories = [
        [{"role": "system", "content": system_prompt(c)}, {"role": "user", "content": f"What does shelf 3 of archive {c} hold?"}]
        for c in range(conversations)
    ]
    for h in histories:
        _, answer, _, _ = turn(port, model, h)
        h.append({"role": "assistant", "content": answer})
    ttfts, decoded = [], []
    for r in range(rounds):
        for c, h in enumerate(histories):
            h.append({"role": "user", "content": f"And shelf {(r * 5 + c) % 13}?"})
            first, answer, cached, prompt = turn(port, model, h)
            h.append({"role": "assistant", "content": answer})
            ttfts.append(first)
            if cached is not None and prompt is not None:
                decoded.append(prompt - cached)
    return ttfts, decoded


def run(name, command, port, model, rounds):
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, proc)
        warm, warm_decoded = play(port, model, 4, rounds)
        cycled, cycled_decoded = play(port, model, 8, rounds)
    finally:
        proc.terminate()
        proc.wait()
    w, c = statistics.median(warm), statistics.median(cycled)
    print(
        f"{name}: warm slot {w * 1e3:.0f} ms, slot taken by another conversation {c * 1e3:.0f} ms "
        f"(x{c / w:.2f} of warm); tokens decoded per turn: warm {statistics.median(warm_decoded) if warm_decoded else '?'}, "
        f"taken {statistics.median(cycled_decoded) if cycled_decoded else '?'} (max {max(cycled_decoded) if cycled_decoded else '?'})"
    )
    return c


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    genius, model = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    llama_server = os.environ.get("LLAMA_SERVER")
    port = free_port()
    ours = run(
        "genius serve",
        [genius, "serve", "--addr", f"127.0.0.1:{port}", "--model", model, "--parallel", "4",
         "--ctx-size", "4096", "--threads", THREADS, "--no-kv-snapshots"]
        + os.environ.get("GENIUS_ARGS", "").split(),
        port,
        os.path.splitext(os.path.basename(model))[0],
        rounds,
    )
    if llama_server:
        port = free_port()
        theirs = run(
            "llama-server --cache-ram 8192",
            [llama_server, "--port", str(port), "-m", model, "--parallel", "4", "-c", "16384",
             "--threads", THREADS, "--cache-ram", "8192", "--jinja"],
            port,
            "model",
            rounds,
        )
        print(f"genius / llama-server, a taken slot's turn: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
