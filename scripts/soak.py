#!/usr/bin/env python3
"""Soak the local deployment: mixed valid, invalid and abandoned requests for a fixed time,
spread over every gateway, then report what happened and what was left behind.

    cargo build --release -p moe-worker
    python3 scripts/soak.py --minutes 10 --gateways 2

Starts `moe-worker local` itself (loopback only, mutual TLS between workers as by default) and
prints: requests sent, succeeded, refused (4xx/429/503), failed otherwise (must be 0); the
resident memory of every process at the start (after warm-up) and the end; the KV caches the
stages hold at the end (must be 0, once the abandoned requests' caches were released). Exits
non-zero when a request failed otherwise, a cache was left, or a process's memory grew by more
than --max-growth over the second half of the soak (the first half is warm-up).

Also measures requests/s with every gateway against one gateway on the same pipeline
(`--throughput-seconds`), which is the figure for "2 gateways vs 1".

Standard library only.
"""

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def children(pid):
    """Every descendant pid of `pid`."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"VmRSS:\s+(\d+)", f.read())
            return int(m.group(1)) if m else 0
    except OSError:
        return 0


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in args if a]
    role = next((a for a in args if a in ("gateway", "stage", "expert")), "launcher")
    idx = args[args.index("--index") + 1] if "--index" in args else ""
    return f"{role} {idx}".strip()


def request(base, method, path, body=None, timeout=120.0, read_bytes=None):
    """(status, body bytes); status 0 when the connection failed."""
    host, port = base.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        c.request(method, path, body=data, headers={"content-type": "application/json"})
        r = c.getresponse()
        if read_bytes is not None:
            # An abandoned stream: read a little, then hang up.
            r.read(read_bytes)
            return r.status, b""
        return r.status, r.read()
    except (OSError, http.client.HTTPException) as e:
        return 0, str(e).encode()
    finally:
        c.close()


INVALID = [
    b"{not json",
    json.dumps({"prompt": "x", "max_tokens": -3}).encode(),
    json.dumps({"prompt": [10**9], "max_tokens": 2}).encode(),
    json.dumps({"prompt": "hi", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "hi", "n": 4}).encode(),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
    json.dumps({"prompt": "x" * 5000, "max_tokens": 8}).encode(),
    b"[]",
]


def worker(bases, deadline, stats, lock, seed):
    rng = random.Random(seed)
    while time.time() < deadline:
        base = rng.choice(bases)
        kind = rng.random()
        if kind < 0.6:
            n = rng.randint(1, 24)
            body = {"prompt": [rng.randint(3, 255) for _ in range(rng.randint(1, 40))],
                    "max_tokens": n, "temperature": rng.choice([0, 0.8]), "ignore_eos": True}
            if rng.random() < 0.3:
                body = {"messages": [{"role": "user", "content": "tell me about experts"}],
                        "max_tokens": n}
                path = "/v1/chat/completions"
            else:
                path = "/v1/completions"
            status, _ = request(base, "POST", path, body)
            key = "valid"
        elif kind < 0.8:
            status, _ = request(base, "POST", "/v1/completions", rng.choice(INVALID))
            key = "invalid"
        else:
            body = {"prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
            status, _ = request(base, "POST", "/v1/completions", body, read_bytes=rng.randint(1, 400))
            key = "abandoned"
        with lock:
            stats["sent"] += 1
            stats[key] += 1
            if key == "abandoned" and status == 200:
                stats["abandoned_ok"] += 1
            elif 200 <= status < 300:
                stats["ok"] += 1
            elif status in (400, 404, 413, 422, 429, 503):
                stats["refused"] += 1
                stats.setdefault(f"refused_{status}", 0)
                stats[f"refused_{status}"] += 1
            else:
                stats["failed"] += 1
                stats.setdefault(f"failed_{status}", 0)
                stats[f"failed_{status}"] += 1


def throughput(bases, seconds, clients=8):
    """Completed greedy requests per second with `clients` concurrent clients over `bases`."""
    done = [0]
    lock = threading.Lock()
    deadline = time.time() + seconds

    def run(i):
        base = bases[i % len(bases)]
        while time.time() < deadline:
            s, _ = request(base, "POST", "/v1/completions",
                           {"prompt": [3 + i, 4, 5, 6], "max_tokens": 8, "temperature": 0,
                            "ignore_eos": True})
            if s == 200:
                with lock:
                    done[0] += 1

    ts = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0] / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--max-growth", type=float, default=1.10,
                    help="largest growth of any process's memory over the second half of the "
                         "soak (the first half is warm-up: allocator pools, caches, buffers)")
    ap.add_argument("--throughput-seconds", type=float, default=30)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/moe-worker"))
    a = ap.parse_args()
    if not os.path.exists(a.binary):
        target = os.environ.get("CARGO_TARGET_DIR")
        if target and os.path.exists(os.path.join(target, "release/moe-worker")):
            a.binary = os.path.join(target, "release/moe-worker")
        else:
            sys.exit(f"{a.binary} not found: cargo build --release -p moe-worker")

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    launcher = subprocess.Popen(
        [a.binary, "--threads", "1", "local", "--model", a.model, "--stages", str(a.stages),
         "--expert-shards", str(a.expert_shards), "--gateways", str(a.gateways),
         "--http-port", str(port), "--max-sequences", "16", "--step-timeout-ms", "20000"],
        stdout=subprocess.PIPE, text=True)
    bases = []
    for line in launcher.stdout:
        if line.startswith("OpenAI endpoint:"):
            bases = [line.split("http://")[1].split("/v1")[0]]
        elif line.startswith("gateway endpoints:"):
            bases = [e.split("http://")[1].split("/v1")[0] for e in line.split()[2:]]
        elif line.startswith("try:"):
            break
    threading.Thread(target=lambda: [None for _ in launcher.stdout], daemon=True).start()
    try:
        # 2 gateways vs 1 on the same pipeline, the same load.
        one = throughput(bases[:1], a.throughput_seconds)
        every = throughput(bases, a.throughput_seconds)
        print(f"throughput: {len(bases)} gateways {every:.2f} req/s, 1 gateway {one:.2f} req/s, "
              f"ratio {every / one if one else float('nan'):.2f}x")

        pids = children(launcher.pid)
        start_rss = {p: rss_kib(p) for p in pids}
        stats = {"sent": 0, "valid": 0, "invalid": 0, "abandoned": 0, "ok": 0,
                 "abandoned_ok": 0, "refused": 0, "failed": 0}
        lock = threading.Lock()
        deadline = time.time() + a.minutes * 60
        ts = [threading.Thread(target=worker, args=(bases, deadline, stats, lock, i))
              for i in range(a.clients)]
        t0 = time.time()
        for t in ts:
            t.start()
        # Memory of every process once a minute while the load runs.
        series = {p: [] for p in pids}
        while any(t.is_alive() for t in ts):
            time.sleep(min(60.0, max(0.0, deadline - time.time())) or 1.0)
            for p in pids:
                series[p].append(rss_kib(p))
        for t in ts:
            t.join()
        took = time.time() - t0
        # Abandoned sequences are released by the lanes between steps: give them a moment.
        time.sleep(3)
        held = []
        for b in bases:
            st, body = request(b, "GET", "/v1/stats")
            if st == 200:
                held.append(sum(x.get("activeSequences", 0) for x in json.loads(body)["stages"]))
        end_rss = {p: rss_kib(p) for p in pids}
        print(f"soak: {took / 60:.1f} min, {len(bases)} gateways, {a.clients} clients")
        print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        print("| process | RSS at start (MiB) | once a minute (MiB) | at end (MiB) | end / start | end / half-time |")
        print("|---|---|---|---|---|---|")
        worst = 0.0
        for p in pids:
            r0, r1 = start_rss[p] / 1024, end_rss[p] / 1024
            mid = series[p][len(series[p]) // 2] / 1024 if series[p] else r0
            late = r1 / mid if mid else float("nan")
            worst = max(worst, late if mid else 0)
            each = " ".join(f"{x / 1024:.0f}" for x in series[p])
            print(f"| {cmdline(p)} (pid {p}) | {r0:.1f} | {each} | {r1:.1f} | "
                  f"{r1 / r0 if r0 else float('nan'):.2f}x | {late:.2f}x |")
        print(f"KV caches held at the end (each gateway's view of every stage): {held}")
        ok = stats["failed"] == 0 and all(h == 0 for h in held) and worst <= a.max_growth
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()


if __name__ == "__main__":
    sys.exit(main())
