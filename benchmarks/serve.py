"""Serving throughput and latency: 1, 4 and 16 concurrent clients against a live ``kinetic serve``.

The script starts ``kinetic serve`` on a free loopback port (a separate process, as a deployment
runs it), then for each mode (greedy, sampled) and each number of clients C runs C client threads,
each sending ``--requests`` streamed ``/v1/completions`` requests one after another. It reports
completion tokens per second over the wall time, time to first token, and the p50/p99 request
latency; greedy answers are compared with the same request sent alone (the 1-client run), which
continuous batching must not change.

    python benchmarks/serve.py                                   # the quickstart checkpoint
    python benchmarks/serve.py --checkpoint CK --clients 1 4 16 --max-tokens 64 --json /tmp/serve.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

QUICKSTART = Path("runs/quickstart/pretrain")
PROMPTS = ["The Congress shall", "def parse_args(", "The state of the Union is", "import numpy as np\n",
           "We the People of the United States", "class Parser:\n    def __init__(self",
           "Let x be a real number such that", "The President shall", "for i in range(",
           "Mr. Speaker, Mr. Vice President", "What is the sum of", "def main():\n    ",
           "In the year", "return self.", "Find the value of", "Our economy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kinetic.cli", "serve", "--checkpoint", checkpoint, "--port", str(port),
           "--log-level", "warning", "--max-active", "16", "--max-n", "16", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kinetic serve exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("kinetic serve did not start within 300 s")


def request(port: int, body: dict) -> dict:
    """One streamed completion: its text, completion tokens, time to first token and latency."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    text, first, tokens = [], None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice.get("text"):
                first = first or time.perf_counter()
                text.append(choice["text"])
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "ttft": (first or end) - t0, "latency": end - t0}


def load(port: int, clients: int, requests: int, body: dict) -> dict:
    """``clients`` threads, each sending ``requests`` requests in turn (prompt i of client c is
    PROMPTS[(c + i * clients) % len]); throughput and latencies."""
    results: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            prompt = PROMPTS[(c + i * clients) % len(PROMPTS)]
            out = request(port, {**body, "prompt": prompt})
            with lock:
                results.append((prompt, out))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for _, r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "tokens": sum(r["tokens"] for _, r in results),
            "tokens_per_s": sum(r["tokens"] for _, r in results) / wall,
            "ttft_p50_s": statistics.median(r["ttft"] for _, r in results),
            "latency_p50_s": statistics.median(lat),
            "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "answers": {p: r["text"] for p, r in results}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(QUICKSTART))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4,
                        help="requests per client (at least enough for every prompt once)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--server-args", default="", help="extra kinetic serve flags, e.g. '--compile'")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    port = free_port()
    server = start_server(args.checkpoint, port, args.server_args.split())
    out = {"checkpoint": args.checkpoint, "max_tokens": args.max_tokens, "server_args": args.server_args,
           "modes": {}}
    try:
        modes = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.8, "top_k": 40, "seed": 1}}
        for mode, sampling in modes.items():
            body = {"max_tokens": args.max_tokens, "ignore_eos": True, **sampling}
            # the reference: every prompt sent alone (also warms the server up)
            alone = load(port, 1, len(PROMPTS), body)["answers"]
            rows = []
            for c in args.clients:
                row = load(port, c, max(args.requests, -(-len(PROMPTS) // c)), body)
                row["identical_to_alone"] = all(alone[p] == t for p, t in row.pop("answers").items())
                rows.append(row)
            base = rows[0]["tokens_per_s"]
            for row in rows:
                row["vs_one_client"] = row["tokens_per_s"] / base
            out["modes"][mode] = rows
    finally:
        server.terminate()
        server.wait(30)
    print(f"kinetic serve {args.checkpoint} {args.server_args}; {args.max_tokens} tokens per request\n")
    print(f"{'mode':<8} {'clients':>7} {'requests':>8} {'tok/s':>8} {'vs 1':>6} {'TTFT p50':>9} "
          f"{'lat p50':>8} {'lat p99':>8} {'same as alone':>14}")
    for mode, rows in out["modes"].items():
        for r in rows:
            print(f"{mode:<8} {r['clients']:>7} {r['requests']:>8} {r['tokens_per_s']:>8.1f} "
                  f"{r['vs_one_client']:>5.2f}x {r['ttft_p50_s'] * 1e3:>7.0f}ms {r['latency_p50_s']:>7.2f}s "
                  f"{r['latency_p99_s']:>7.2f}s {str(r['identical_to_alone']):>14}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
