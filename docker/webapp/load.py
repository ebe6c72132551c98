#!/usr/bin/env python3
"""Bounded client load for the sluice drills, run inside the client container.

  load.py run --url URL --rate R --duration S [--slow-every K --slow-ms M] [--timeout T]
      R requests a second for S seconds (R*S requests in all, never more),
      each a fresh connection with a unique id (GET URL/visit?id=...). Every
      K-th request asks the app to take M ms. Prints one JSON line per
      request: i, t0 and t1 (wall clock, seconds), ok, status, app, write,
      read, err.
  load.py get URL [--timeout T]
      One GET; prints the status on the first line and the body after it.
"""

import argparse
import http.client
import json
import signal
import sys
import threading
import time
import uuid
from urllib.parse import urlparse


def get(url, timeout):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def one(base, i, slow_ms, timeout):
    rid = uuid.uuid4().hex
    url = f"{base}/visit?id={rid}" + (f"&slow_ms={slow_ms}" if slow_ms else "")
    rec = {"i": i, "id": rid, "slow": bool(slow_ms), "t0": time.time()}
    try:
        status, body = get(url, timeout)
        rec["status"] = status
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        rec.update({k: data.get(k) for k in ("app", "write", "read")})
        rec["ok"] = status == 200 and bool(data.get("write")) and bool(data.get("read"))
        if not rec["ok"]:
            rec["err"] = data.get("error") or body[:200]
    except OSError as e:
        rec["ok"] = False
        rec["err"] = f"{type(e).__name__}: {e}"
    except http.client.HTTPException as e:
        rec["ok"] = False
        rec["err"] = f"{type(e).__name__}: {e}"
    rec["t1"] = time.time()
    return rec


def run(args):
    total = int(args.rate * args.duration)
    start = time.time() + 0.05
    results = [None] * total
    next_i = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= total:
                    return
                next_i[0] += 1
            due = start + i / args.rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            slow = args.slow_ms if args.slow_every and i % args.slow_every == 0 else 0
            results[i] = one(args.url, i, slow, args.timeout)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rec in results:
        print(json.dumps(rec))


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--url", required=True)
    r.add_argument("--rate", type=float, default=40)
    r.add_argument("--duration", type=float, default=10)
    r.add_argument("--slow-every", type=int, default=0)
    r.add_argument("--slow-ms", type=int, default=0)
    r.add_argument("--timeout", type=float, default=5)
    r.add_argument("--workers", type=int, default=48)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--timeout", type=float, default=3)
    args = p.parse_args()
    if args.cmd == "run":
        if args.rate * args.duration > 20_000:
            p.error("at most 20000 requests a run")
        run(args)
    else:
        try:
            status, body = get(args.url, args.timeout)
        except (OSError, http.client.HTTPException) as e:
            print(f"0\n{type(e).__name__}: {e}")
            sys.exit(1)
        print(status)
        print(body, end="")


if __name__ == "__main__":
    main()
