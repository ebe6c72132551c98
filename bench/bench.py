#!/usr/bin/env python3
"""Side-by-side benchmark: direct vs HAProxy vs NGINX stream vs sluice.

Every workload runs through four paths on 127.0.0.1 in one run, interleaved
(the path order rotates each repeat) so that drift on a noisy machine hits all
paths alike; each figure is the median over the repeats. The table goes to
stdout and, with the machine description, to bench/RESULTS.md.

Workloads (two redis backends where the workload allows, one iperf3 server):
  - redis-benchmark PING, 50 clients: rate, p50 and p99 latency
  - the same pipelined (-P 16), and with a new TCP connection per request (-k 0)
  - iperf3 bulk throughput, 1 and 4 streams
  - proxy CPU seconds per GB relayed and per million requests (/proc/PID/stat)
  - RSS growth per idle proxied connection at several connection counts
  - request rate at several client counts

Run through `make bench`, which installs the packages and builds sluice.
"""

import argparse
import csv
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLUICE = ROOT / "target" / "release" / "sluice"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

REDIS_PORTS = (16379, 16380)
IPERF_PORT = 15201
# Each path: (redis port, iperf port). Direct goes to the first redis backend.
PATHS = {
    "direct": (REDIS_PORTS[0], IPERF_PORT),
    "haproxy": (17001, 17002),
    "nginx": (17101, 17102),
    "sluice": (17201, 17202),
}
PEERS = ("haproxy", "nginx")
SLUICE_ADMIN = 17209


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def wait_port(port, deadline=10.0):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


class Proc:
    """A server process this script started; stopped by its PID."""

    def __init__(self, argv, name, **kw):
        self.name = name
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

    def pids(self):
        """The processes that do the proxying (the worker, for NGINX)."""
        kids = subprocess.run(["pgrep", "-P", str(self.p.pid)], capture_output=True, text=True).stdout.split()
        return [int(k) for k in kids] if self.name == "nginx" and kids else [self.p.pid]

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT if self.name != "nginx" else signal.SIGQUIT)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def write(path, text):
    Path(path).write_text(text)
    return str(path)


def haproxy_conf(d, maxconn):
    return write(d / "haproxy.cfg", f"""
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    # Let HAProxy splice bulk transfers in the kernel, as sluice does.
    option splice-auto
    timeout connect 2s
    timeout client 10m
    timeout server 10m
frontend redis
    bind 127.0.0.1:{PATHS['haproxy'][0]}
    default_backend redis
backend redis
    balance roundrobin
    server r1 127.0.0.1:{REDIS_PORTS[0]} check inter 2s
    server r2 127.0.0.1:{REDIS_PORTS[1]} check inter 2s
frontend iperf
    bind 127.0.0.1:{PATHS['haproxy'][1]}
    default_backend iperf
backend iperf
    server i1 127.0.0.1:{IPERF_PORT} check inter 2s
""")


def nginx_conf(d, maxconn):
    return write(d / "nginx.conf", f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile {maxconn * 2 + 100};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections {maxconn * 2 + 100}; }}
stream {{
    upstream redis {{ server 127.0.0.1:{REDIS_PORTS[0]}; server 127.0.0.1:{REDIS_PORTS[1]}; }}
    upstream iperf {{ server 127.0.0.1:{IPERF_PORT}; }}
    server {{ listen 127.0.0.1:{PATHS['nginx'][0]}; proxy_pass redis; proxy_timeout 10m; }}
    server {{ listen 127.0.0.1:{PATHS['nginx'][1]}; proxy_pass iperf; proxy_timeout 10m; }}
}}
""")


def sluice_conf(d):
    return write(d / "sluice.yaml", f"""
server: {{ threads: 1, grace_period: 0s, shutdown_timeout: 1s }}
admin: {{ bind: 127.0.0.1:{SLUICE_ADMIN} }}
listeners:
  redis: {{ bind: 127.0.0.1:{PATHS['sluice'][0]}, pool: redis, idle_timeout: 10m }}
  iperf: {{ bind: 127.0.0.1:{PATHS['sluice'][1]}, pool: iperf, idle_timeout: 10m }}
pools:
  redis: {{ backends: [127.0.0.1:{REDIS_PORTS[0]}, 127.0.0.1:{REDIS_PORTS[1]}] }}
  iperf: {{ backends: [127.0.0.1:{IPERF_PORT}] }}
""")


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.d = workdir
        self.backends = []
        self.proxies = {}

    # --- processes -------------------------------------------------------------

    def start_backends(self):
        for port in REDIS_PORTS:
            self.backends.append(Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--maxclients", "19000", "--protected-mode", "no"],
                                      "redis"))
        self.backends.append(Proc(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)], "iperf3"))
        for port in (*REDIS_PORTS, IPERF_PORT):
            wait_port(port)

    def start_proxies(self):
        maxconn = self.args.max_conns + 200
        self.proxies = {
            "haproxy": Proc(["haproxy", "-db", "-f", haproxy_conf(self.d, maxconn)], "haproxy"),
            "nginx": Proc(["nginx", "-c", nginx_conf(self.d, maxconn), "-g", "daemon off;"], "nginx"),
            "sluice": Proc([str(SLUICE), "-c", sluice_conf(self.d)], "sluice", env={**os.environ, "RUST_LOG": "warn"}),
        }
        for name in self.proxies:
            for port in PATHS[name]:
                wait_port(port)
        time.sleep(0.5)  # let NGINX fork its worker and every health check settle

    def stop_proxies(self):
        for p in self.proxies.values():
            p.stop()
        self.proxies = {}

    def stop_all(self):
        self.stop_proxies()
        for b in self.backends:
            b.stop()

    def pids(self, path):
        return self.proxies[path].pids() if path in self.proxies else []

    # --- workloads -------------------------------------------------------------

    def redis(self, path, extra, requests, clients=50):
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(PATHS[path][0]), "-c", str(clients),
                "-n", str(requests), "-t", "ping_mbulk", "--csv", *extra]
        pids = self.pids(path)
        c0 = cpu_seconds(pids) if pids else 0
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
        cpu = cpu_seconds(pids) - c0 if pids else None
        row = next(csv.DictReader(io.StringIO(out)))
        return {"rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]), "p99": float(row["p99_latency_ms"]),
                "cpu_per_mreq": cpu / requests * 1e6 if cpu is not None else None}

    def iperf(self, path, streams):
        pids = self.pids(path)
        c0 = cpu_seconds(pids) if pids else 0
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(PATHS[path][1]), "-t", str(self.args.iperf_seconds),
                              "-P", str(streams), "-J"], capture_output=True, text=True, timeout=120).stdout
        cpu = cpu_seconds(pids) - c0 if pids else None
        result = json.loads(out)["end"]
        received = result["sum_received"]
        gbytes = received["bytes"] / 1e9
        return {"gbps": received["bits_per_second"] / 1e9,
                "cpu_per_gb": cpu / gbytes if cpu is not None else None}

    def idle_memory(self, path, count):
        """RSS growth of the proxy per idle connection held through it."""
        pids = self.pids(path)
        before = rss_bytes(pids)
        socks = []
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", PATHS[path][0]))
                socks.append(s)
            # One round trip on the last connection: by then the proxy has
            # connected every earlier one to its backend too.
            socks[-1].sendall(b"PING\r\n")
            socks[-1].recv(16)
            time.sleep(1.0)
            after = rss_bytes(pids)
        finally:
            for s in socks:
                s.close()
        return (after - before) / count

    # --- the run ----------------------------------------------------------------

    def run(self):
        a = self.args
        results = {}  # (metric, path) -> [values]

        def add(metric, path, value):
            if value is not None:
                results.setdefault((metric, path), []).append(value)

        order = list(PATHS)
        for r in range(a.repeats):
            order = order[1:] + order[:1]
            log(f"repeat {r + 1}/{a.repeats}: order {order}")
            for path in order:
                m = self.redis(path, [], a.requests)
                add("PING rate (req/s)", path, m["rps"])
                add("PING p50 latency (ms)", path, m["p50"])
                add("PING p99 latency (ms)", path, m["p99"])
                add("proxy CPU s per million requests", path, m["cpu_per_mreq"])
            for path in order:
                m = self.redis(path, ["-P", "16"], a.requests * 10)
                add("pipelined PING rate, -P 16 (req/s)", path, m["rps"])
                add("proxy CPU s per million pipelined requests", path, m["cpu_per_mreq"])
            for path in order:
                m = self.redis(path, ["-k", "0"], a.churn_requests)
                add("churn rate, new connection per request (req/s)", path, m["rps"])
                add("proxy CPU s per million requests, new connection each", path, m["cpu_per_mreq"])
            for path in order:
                m = self.iperf(path, 1)
                add("bulk throughput, 1 stream (Gbit/s)", path, m["gbps"])
                add("proxy CPU s per GB relayed, 1 stream", path, m["cpu_per_gb"])
            for path in order:
                m = self.iperf(path, 4)
                add("bulk throughput, 4 streams (Gbit/s)", path, m["gbps"])
                add("proxy CPU s per GB relayed, 4 streams", path, m["cpu_per_gb"])
            for clients in a.client_counts:
                for path in order:
                    add(f"PING rate at {clients} clients (req/s)", path,
                        self.redis(path, [], max(a.requests, clients * 40), clients=clients)["rps"])
            for count in a.idle_counts:
                # Fresh processes, so one run's allocator caches do not hide the next one's growth.
                self.stop_proxies()
                self.start_proxies()
                for path in order:
                    if path == "direct":
                        continue
                    add(f"memory per idle connection at {count} (bytes)", path, self.idle_memory(path, count))
        return results


LOWER_IS_BETTER = ("latency", "CPU", "memory")


def table(results):
    metrics = []
    for (metric, _path) in results:
        if metric not in metrics:
            metrics.append(metric)
    header = "| figure | direct | HAProxy | NGINX | sluice | sluice / best peer | sluice / direct |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(v):
        if v is None:
            return "–"
        if v >= 1000:
            return f"{v:,.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"

    for metric in metrics:
        med = {p: statistics.median(results[(metric, p)]) if (metric, p) in results else None for p in PATHS}
        lower = any(k in metric for k in LOWER_IS_BETTER)
        peers = [med[p] for p in PEERS if med[p] is not None]
        best = (min(peers) if lower else max(peers)) if peers else None
        s = med["sluice"]
        vs_best = f"{s / best:.2f}×" if s is not None and best else "–"
        vs_direct = f"{s / med['direct']:.2f}×" if s is not None and med["direct"] else "–"
        lines.append(f"| {metric} | {fmt(med['direct'])} | {fmt(med['haproxy'])} | {fmt(med['nginx'])} | {fmt(s)} "
                     f"| {vs_best} | {vs_direct} |")
    return "\n".join(lines)


def version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                           text=True).stdout.strip()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "\n".join([
        f"- machine: {os.cpu_count()} × {cpu}, {int(mem) // 1024 // 1024} GiB RAM, Linux {platform.release()}",
        f"- open-file limit per process: {soft} (hard {hard})",
        f"- sluice {commit}{' + uncommitted changes' if dirty else ''}, release build, `threads: 1`",
        f"- {version(['haproxy', '-v'])} (`nbthread 1`, `option splice-auto`)",
        f"- {version(['nginx', '-v'])} stream module (`worker_processes 1`)",
        f"- {version(['redis-server', '--version'])}; {version(['iperf3', '--version'])}",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200_000, help="PING requests per run (x10 pipelined)")
    ap.add_argument("--churn-requests", type=int, default=20_000)
    ap.add_argument("--iperf-seconds", type=int, default=5)
    ap.add_argument("--client-counts", type=int, nargs="*", default=[500, 9000])
    ap.add_argument("--idle-counts", type=int, nargs="*", default=[500, 5000, 9000])
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A proxy holds two descriptors per connection.
    limit = (hard - 200) // 2
    for counts in (args.idle_counts, args.client_counts):
        too_many = [c for c in counts if c > limit]
        if too_many:
            log(f"skipping {too_many}: the open-file limit ({hard}) allows at most {limit} proxied connections")
            counts[:] = [c for c in counts if c <= limit]
    args.max_conns = max([*args.idle_counts, *args.client_counts, 50])
    if not SLUICE.exists():
        sys.exit(f"{SLUICE} is missing: run `make bench` (or cargo build --release)")

    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    bench = Bench(args, workdir)
    started = time.time()
    try:
        bench.start_backends()
        bench.start_proxies()
        results = bench.run()
    finally:
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    took = time.time() - started
    t = table(results)
    print(t)
    text = f"""# Benchmark results

The last real run of `make bench` (`bench/bench.py`), written by the script itself.

{machine()}
- {args.repeats} repeats, paths interleaved in rotating order; each figure is the median; run took {took / 60:.1f} min

{t}

Notes:
- Client, backends and proxy share this machine's {os.cpu_count()} cores, so rates and throughput are bounded by
  contention; the proxy's CPU seconds per unit of work is the figure that carries over to production.
- Ratios: `sluice / best peer` compares with the better of HAProxy and NGINX on that line (lower is better for
  latency, CPU and memory; higher for rates and throughput).
- Memory per idle connection: RSS growth of the proxy process (NGINX: its worker) while the given number of idle
  client connections are held open through it to redis, divided by that number; fresh proxy processes for each count.
- Connection counts are capped by the open-file limit above: a proxy holds two descriptors per connection.
"""
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
