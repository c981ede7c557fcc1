"""A soak of `genius serve` holding three models: many clients at once,
every dialect, embeddings, completions and cancels, for minutes.

    python3 crates/cli/benches/soak.py target/release/genius \
        <qwen.gguf> <gemma.gguf> <minilm.gguf> [seconds] [clients] [-- serve args]

Defaults: 300 seconds, 32 clients. Each client loops over one kind of
request, chosen by its number:

- Qwen chats through OpenAI's /v1/chat/completions, Ollama's /api/chat
  and Anthropic's /v1/messages, streamed, 48 tokens at most;
- MiniLM embeddings (/v1/embeddings, 8 sentences);
- gemma completions (/v1/completions, streamed, 48 tokens);
- cancels: a streamed Qwen chat dropped after its first few events.

Printed at the end: requests by kind, errors (any status but 200, any
broken stream), time to first token (p50, p99, worst) of the streamed
ones, tokens generated per second over the whole run, and the server's
resident memory sampled every 10 s with its growth per minute after a
one-minute warm-up (least squares). Pass serve arguments after `--`
(e.g. `-- --threads 1`) to compare. No network beyond loopback.
"""

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

MAX_TOKENS = 48


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, path, body):
    """Sends a POST; returns the socket file to read the answer from."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock, sock.makefile("rb")


def read_status(reader):
    status = reader.readline().decode(errors="replace")
    headers = {}
    while True:
        line = reader.readline().decode(errors="replace").strip()
        if not line:
            break
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers


def body_lines(reader, headers):
    """The body's lines, through chunked encoding if used."""
    if headers.get("transfer-encoding", "").lower() != "chunked":
        for line in reader:
            yield line.decode(errors="replace")
        return
    pending = b""
    while True:
        size = int(reader.readline().strip() or b"0", 16)
        if size == 0:
            break
        pending += reader.read(size)
        reader.readline()
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode(errors="replace") + "\n"
    if pending:
        yield pending.decode(errors="replace")


def words(rng, n):
    pool = "river stone cloud engine paper window garden silver market planet forest bridge lamp".split()
    return " ".join(rng.choice(pool) for _ in range(n))


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.done = {}
        self.errors = []
        self.first_token = []
        self.tokens = 0

    def record(self, kind, error=None, first=None, tokens=0):
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1
            if error:
                self.errors.append(f"{kind}: {error}")
            if first is not None:
                self.first_token.append(first)
            self.tokens += tokens


def stream(port, path, body, is_token, cancel_after=None):
    """A streamed request: (time to first token, tokens, error)."""
    started = time.time()
    sock, reader = request(port, path, body)
    try:
        status, headers = read_status(reader)
        if " 200 " not in status:
            return None, 0, status.strip() + " " + reader.read(300).decode(errors="replace")
        first, tokens, events = None, 0, 0
        for line in body_lines(reader, headers):
            line = line.strip()
            if line.startswith("data:"):
                line = line[5:].strip()
            if not line or line.startswith("event:") or line == "[DONE]":
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events += 1
            if is_token(event):
                tokens += 1
                if first is None:
                    first = time.time() - started
            if cancel_after is not None and events >= cancel_after:
                return first, tokens, None
        if tokens == 0:
            return first, 0, "no tokens streamed"
        return first, tokens, None
    finally:
        reader.close()
        sock.close()


def openai_token(event):
    choice = (event.get("choices") or [{}])[0]
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


def ollama_token(event):
    return bool((event.get("message") or {}).get("content"))


def anthropic_token(event):
    return event.get("type") == "content_block_delta" and bool(
        (event.get("delta") or {}).get("text")
    )


def client(number, port, models, stats, until):
    qwen, gemma, minilm = models
    rng = random.Random(number * 7919 + int(time.time()))
    kinds = ["openai", "ollama", "anthropic", "embed", "gemma", "cancel", "openai", "gemma"]
    kind = kinds[number % len(kinds)]
    while time.time() < until:
        question = f"Tell me about the {words(rng, 3)} in two sentences."
        try:
            if kind == "openai":
                first, tokens, error = stream(port, "/v1/chat/completions", {
                    "model": qwen, "stream": True, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": question}],
                }, openai_token)
            elif kind == "ollama":
                first, tokens, error = stream(port, "/api/chat", {
                    "model": qwen, "stream": True, "options": {"num_predict": MAX_TOKENS},
                    "messages": [{"role": "user", "content": question}],
                }, ollama_token)
            elif kind == "anthropic":
                first, tokens, error = stream(port, "/v1/messages", {
                    "model": qwen, "stream": True, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": question}],
                }, anthropic_token)
            elif kind == "gemma":
                first, tokens, error = stream(port, "/v1/completions", {
                    "model": gemma, "stream": True, "max_tokens": MAX_TOKENS,
                    "prompt": f"A list of {words(rng, 2)}:\n1.",
                }, openai_token)
            elif kind == "cancel":
                first, tokens, error = stream(port, "/v1/chat/completions", {
                    "model": qwen, "stream": True, "max_tokens": 256,
                    "messages": [{"role": "user", "content": question}],
                }, openai_token, cancel_after=4)
            else:
                sock, reader = request(port, "/v1/embeddings", {
                    "model": minilm, "input": [words(rng, 12) for _ in range(8)],
                })
                status, _ = read_status(reader)
                body = reader.read()
                reader.close()
                sock.close()
                error = None
                if " 200 " not in status:
                    error = status.strip() + " " + body[:300].decode(errors="replace")
                stats.record(kind, error)
                continue
            stats.record(kind, error, None if kind == "cancel" else first, tokens)
        except OSError as err:
            stats.record(kind, repr(err))


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    args = sys.argv[1:]
    extra = []
    if "--" in args:
        extra = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    if len(args) < 4:
        raise SystemExit(__doc__)
    genius, qwen, gemma, minilm = args[:4]
    seconds = float(args[4]) if len(args) > 4 else 300
    clients = int(args[5]) if len(args) > 5 else 32
    port = free_port()
    command = [genius, "serve", "--addr", f"127.0.0.1:{port}", "--no-kv-snapshots",
               "-m", qwen, "-m", gemma, "-m", minilm] + extra
    server = subprocess.Popen(command, stderr=subprocess.PIPE, env={**os.environ, "RUST_LOG": "warn"})
    log = []
    threading.Thread(target=lambda: [log.append(l) for l in server.stderr], daemon=True).start()
    names = [os.path.splitext(os.path.basename(p))[0] for p in (qwen, gemma, minilm)]
    try:
        deadline = time.time() + 300
        while True:
            try:
                sock, reader = request(port, "/v1/embeddings", {"model": names[2], "input": "ready"})
                ok = " 200 " in read_status(reader)[0]
                reader.close()
                sock.close()
                if ok:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not come up:\n" + b"".join(log).decode(errors="replace"))
            time.sleep(0.5)
        stats = Stats()
        started = time.time()
        until = started + seconds
        threads = [threading.Thread(target=client, args=(n, port, names, stats, until))
                   for n in range(clients)]
        for thread in threads:
            thread.start()
        samples = []
        while any(t.is_alive() for t in threads):
            samples.append((time.time() - started, rss(server.pid)))
            time.sleep(10)
        elapsed = time.time() - started
        samples.append((elapsed, rss(server.pid)))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"{clients} clients for {elapsed:.0f} s; serve args: {' '.join(extra) or '(none)'}")
    print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.done.items())))
    print(f"errors: {len(stats.errors)}")
    for error in stats.errors[:10]:
        print("  " + error[:300])
    ft = stats.first_token
    print(f"time to first token: p50 {percentile(ft, 50):.2f} s, p99 {percentile(ft, 99):.2f} s, "
          f"worst {max(ft) if ft else float('nan'):.2f} s ({len(ft)} streams)")
    print(f"generated: {stats.tokens} tokens, {stats.tokens / elapsed:.1f} tokens/s")
    warm = [(t, r) for t, r in samples if t >= 60]
    if len(warm) >= 2:
        mean_t = statistics.fmean(t for t, _ in warm)
        mean_r = statistics.fmean(r for _, r in warm)
        slope = sum((t - mean_t) * (r - mean_r) for t, r in warm) / sum((t - mean_t) ** 2 for t, _ in warm)
        print(f"resident memory: {warm[0][1] / 1e6:.0f} MB after warm-up, {samples[-1][1] / 1e6:.0f} MB at the end, "
              f"{slope * 60 / 1e6:+.2f} MB/min")
    print("server exit status: " + str(server.returncode))
    return 1 if stats.errors else 0


if __name__ == "__main__":
    sys.exit(main())
