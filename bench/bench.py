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
  - the edge lines: sluice's plain listener against one with a 1,000-prefix
    allow list, per-source limits and PROXY v2 sent to the backend (both through
    the same NGINX stream relay to redis, so the header has a reader): PING and
    churn rates (`--edge-rounds` A/B rounds per repeat), memory per idle connection
  - the access-log lines: sluice with `access_log` (JSON to a file) against the
    same sluice without, PING and churn rates, and the bytes per log line
  - TLS termination (HAProxy `ssl`, NGINX stream `ssl`, sluice `tls`; no direct
    path): new TLS 1.3 handshakes per second with an ECDSA P-256 and an RSA 2048
    certificate (`openssl s_time -new`, two clients at once), bulk download
    through termination from a plain HTTP backend (curl, 1 stream) with the
    proxy's CPU per GB, and RSS growth per idle TLS connection
  - the HTTP lines ("HTTP: ..."): HAProxy `mode http` (`http-reuse always`,
    `option http-keep-alive`), NGINX `proxy_pass` to an `upstream` with
    `keepalive 64` (`proxy_http_version 1.1`, `proxy_set_header Connection ""`)
    and a sluice `protocol: http` listener, all round robin over the same two
    NGINX HTTP backends answering a 3-byte body; each proxy writes the same
    X-Forwarded-For, -Proto and -Host (sluice's default). wrk (HTTP/1.1, plain
    and over TLS, with a direct path when plain) and h2load (HTTP/2 over TLS):
    requests/s, p99 latency and the proxy's CPU seconds per million requests

Run through `make bench`, which installs the packages and builds sluice.
Environment: SLUICE_BIN overrides the sluice binary (default
target/release/sluice), e.g. to bench a build made in another checkout; the
results then name that binary and its modification time.
"""

import argparse
import csv
import http.client
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLUICE_DEFAULT = ROOT / "target" / "release" / "sluice"
SLUICE = Path(os.environ.get("SLUICE_BIN") or SLUICE_DEFAULT).resolve()
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
# TLS listeners per proxy: (ECDSA to redis, RSA to redis, ECDSA to the HTTP backend).
TLS_PATHS = {
    "haproxy": (17011, 17012, 17013),
    "nginx": (17111, 17112, 17113),
    "sluice": (17211, 17212, 17213),
}
HTTP_PORT = 15301
# The HTTP lines' second backend: another port of the same NGINX backend process.
HTTP_PORT_2 = 15302
# The HTTP lines, per path: (plain HTTP/1.1, TLS for HTTP/1.1 and HTTP/2).
# Direct has no TLS port: the backends speak plain HTTP.
HTTP_PATHS = {
    "direct": (HTTP_PORT, None),
    "haproxy": (17021, 17022),
    "nginx": (17121, 17122),
    "sluice": (17241, 17242),
}
# The backend's small fixed answer that every HTTP request asks for.
HTTP_SMALL = "/small"
HTTP_SMALL_BODY = b"ok\n"
# The edge lines: two sluice listeners in the one sluice process, each through
# an NGINX stream relay to redis, so that the PROXY v2 header sluice sends has a
# reader (NGINX `listen … proxy_protocol`) and both paths pay the same hop:
#   sluice-plain: no edge keys                      -> NGINX :17302 -> redis
#   sluice-edge:  1,000-prefix allow list, per-source
#                 limits, PROXY v2 to the backend   -> NGINX :17303 (proxy_protocol) -> redis
EDGE_PATHS = {"sluice-plain": 17221, "sluice-edge": 17222}
EDGE_RELAYS = (17302, 17303)
# The access-log lines: the main sluice (no access log) against a second
# sluice process, the same but for `access_log: {path, format: json}` (the
# key is process-wide), both straight to redis.
ALOG_PATHS = {"sluice-nolog": 17201, "sluice-logged": 17231}
ALOG_ADMIN = 17239
BULK_BYTES = 1 << 30


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


def make_certs(d):
    """A self-signed ECDSA P-256 and RSA 2048 certificate for bench.example.com."""
    for kind, args in (("ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                       ("rsa", ["-newkey", "rsa:2048"])):
        subprocess.run(["openssl", "req", "-x509", *args, "-nodes", "-days", "2", "-subj", "/CN=bench.example.com",
                        "-addext", "subjectAltName=DNS:bench.example.com",
                        "-keyout", str(d / f"{kind}.key"), "-out", str(d / f"{kind}.pem")],
                       check=True, capture_output=True)
        # HAProxy takes the chain and the key in one file.
        (d / f"{kind}.both").write_text((d / f"{kind}.pem").read_text() + (d / f"{kind}.key").read_text())


def haproxy_conf(d, maxconn):
    t = TLS_PATHS["haproxy"]
    h = HTTP_PATHS["haproxy"]
    return write(d / "haproxy.cfg", f"""
global
    nbthread 1
    maxconn {maxconn}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    tune.ssl.default-dh-param 2048
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
frontend tls_ecdsa
    bind 127.0.0.1:{t[0]} ssl crt {d}/ecdsa.both
    default_backend redis
frontend tls_rsa
    bind 127.0.0.1:{t[1]} ssl crt {d}/rsa.both
    default_backend redis
frontend tls_bulk
    bind 127.0.0.1:{t[2]} ssl crt {d}/ecdsa.both
    default_backend http
backend http
    server h1 127.0.0.1:{HTTP_PORT} check inter 2s
# The HTTP lines: mode http, kept-alive and reused backend connections, the
# same forwarded headers sluice writes by default.
frontend web_plain
    mode http
    bind 127.0.0.1:{h[0]}
    option http-keep-alive
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend web
frontend web_tls
    mode http
    bind 127.0.0.1:{h[1]} ssl crt {d}/ecdsa.both alpn h2,http/1.1
    option http-keep-alive
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend web
backend web
    mode http
    balance roundrobin
    option http-keep-alive
    http-reuse always
    server w1 127.0.0.1:{HTTP_PORT} check inter 2s
    server w2 127.0.0.1:{HTTP_PORT_2} check inter 2s
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
    # The edge lines' relays (see EDGE_PATHS); not a path of their own.
    server {{ listen 127.0.0.1:{EDGE_RELAYS[0]}; proxy_pass redis; proxy_timeout 10m; }}
    server {{ listen 127.0.0.1:{EDGE_RELAYS[1]} proxy_protocol; proxy_pass redis; proxy_timeout 10m; }}
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{ listen 127.0.0.1:{TLS_PATHS['nginx'][0]} ssl; ssl_certificate {d}/ecdsa.pem;
             ssl_certificate_key {d}/ecdsa.key; proxy_pass redis; proxy_timeout 10m; }}
    server {{ listen 127.0.0.1:{TLS_PATHS['nginx'][1]} ssl; ssl_certificate {d}/rsa.pem;
             ssl_certificate_key {d}/rsa.key; proxy_pass redis; proxy_timeout 10m; }}
    server {{ listen 127.0.0.1:{TLS_PATHS['nginx'][2]} ssl; ssl_certificate {d}/ecdsa.pem;
             ssl_certificate_key {d}/ecdsa.key; proxy_pass 127.0.0.1:{HTTP_PORT}; proxy_timeout 10m; }}
}}
# The HTTP lines: proxy_pass to an upstream with kept-alive connections, no
# request limit on either side, the same forwarded headers sluice writes.
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 10m;
    upstream web {{
        server 127.0.0.1:{HTTP_PORT};
        server 127.0.0.1:{HTTP_PORT_2};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 10m;
    }}
    server {{
        listen 127.0.0.1:{HTTP_PATHS['nginx'][0]};
        listen 127.0.0.1:{HTTP_PATHS['nginx'][1]} ssl http2;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {d}/ecdsa.pem;
        ssl_certificate_key {d}/ecdsa.key;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
""")


def http_conf(d):
    """The plain HTTP backends: NGINX serving one large file (the bulk TLS
    line) and a small fixed answer (the HTTP lines) on two ports, with no
    limit on the requests per kept-alive connection."""
    return write(d / "http.conf", f"""
worker_processes 1;
pid {d}/http.pid;
error_log {d}/http-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 10m;
    server {{
        listen 127.0.0.1:{HTTP_PORT};
        listen 127.0.0.1:{HTTP_PORT_2};
        root {d}/www;
        # NGINX reads \\n in a quoted string as a newline: the body is HTTP_SMALL_BODY.
        location = {HTTP_SMALL} {{ return 200 "ok\\n"; }}
    }}
}}
""")


def allow_list(n):
    """`n` prefixes, 127.0.0.0/8 among them (the bench's clients)."""
    nets = [f"10.{i // 256}.{i % 256}.0/24" for i in range(n - 1)] + ["127.0.0.0/8"]
    return "[" + ", ".join(nets) + "]"


def sluice_logged_conf(d):
    return write(d / "sluice-logged.yaml", f"""
server: {{ threads: 1, grace_period: 0s, shutdown_timeout: 1s }}
admin: {{ bind: 127.0.0.1:{ALOG_ADMIN} }}
access_log: {{ path: {d}/access.log, format: json }}
listeners:
  redis: {{ bind: 127.0.0.1:{ALOG_PATHS['sluice-logged']}, pool: redis, idle_timeout: 10m }}
pools:
  redis: {{ backends: [127.0.0.1:{REDIS_PORTS[0]}, 127.0.0.1:{REDIS_PORTS[1]}] }}
""")


def sluice_conf(d):
    return write(d / "sluice.yaml", f"""
server: {{ threads: 1, grace_period: 0s, shutdown_timeout: 1s }}
admin: {{ bind: 127.0.0.1:{SLUICE_ADMIN} }}
listeners:
  redis: {{ bind: 127.0.0.1:{PATHS['sluice'][0]}, pool: redis, idle_timeout: 10m }}
  iperf: {{ bind: 127.0.0.1:{PATHS['sluice'][1]}, pool: iperf, idle_timeout: 10m }}
  tls_ecdsa: {{ bind: 127.0.0.1:{TLS_PATHS['sluice'][0]}, pool: redis, idle_timeout: 10m,
               tls: {{ cert: {d}/ecdsa.pem, key: {d}/ecdsa.key }} }}
  tls_rsa: {{ bind: 127.0.0.1:{TLS_PATHS['sluice'][1]}, pool: redis, idle_timeout: 10m,
             tls: {{ cert: {d}/rsa.pem, key: {d}/rsa.key }} }}
  tls_bulk: {{ bind: 127.0.0.1:{TLS_PATHS['sluice'][2]}, pool: http, idle_timeout: 10m,
              tls: {{ cert: {d}/ecdsa.pem, key: {d}/ecdsa.key }} }}
  edge_plain: {{ bind: 127.0.0.1:{EDGE_PATHS['sluice-plain']}, pool: relay_plain, idle_timeout: 10m }}
  edge_full: {{ bind: 127.0.0.1:{EDGE_PATHS['sluice-edge']}, pool: relay_proxy, idle_timeout: 10m,
               allow: {allow_list(1000)},
               per_source: {{ max_connections: 100000, rate: 1000000, burst: 1000000 }} }}
  # The HTTP lines; the default forwarded headers (X-Forwarded-For, -Proto, -Host).
  web_plain: {{ bind: 127.0.0.1:{HTTP_PATHS['sluice'][0]}, protocol: http, pool: web, idle_timeout: 10m }}
  web_tls: {{ bind: 127.0.0.1:{HTTP_PATHS['sluice'][1]}, protocol: http, pool: web, idle_timeout: 10m,
             tls: {{ cert: {d}/ecdsa.pem, key: {d}/ecdsa.key }} }}
pools:
  redis: {{ backends: [127.0.0.1:{REDIS_PORTS[0]}, 127.0.0.1:{REDIS_PORTS[1]}] }}
  iperf: {{ backends: [127.0.0.1:{IPERF_PORT}] }}
  http: {{ backends: [127.0.0.1:{HTTP_PORT}] }}
  relay_plain: {{ backends: [127.0.0.1:{EDGE_RELAYS[0]}] }}
  relay_proxy: {{ proxy_protocol: v2, backends: [127.0.0.1:{EDGE_RELAYS[1]}] }}
  web: {{ backends: [127.0.0.1:{HTTP_PORT}, 127.0.0.1:{HTTP_PORT_2}] }}
""")


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.d = workdir
        self.backends = []
        self.proxies = {}
        self.edge_turns = []
        self.logged = None

    # --- processes -------------------------------------------------------------

    def start_backends(self):
        for port in REDIS_PORTS:
            self.backends.append(Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--maxclients", "19000", "--protected-mode", "no"],
                                      "redis"))
        self.backends.append(Proc(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)], "iperf3"))
        make_certs(self.d)
        (self.d / "www").mkdir(exist_ok=True)
        with open(self.d / "www" / "big", "wb") as f:
            f.truncate(BULK_BYTES)  # sparse: reads cost no disk
        # NGINX's worker runs as nobody: it must reach the file.
        for p in (self.d, self.d / "www"):
            os.chmod(p, 0o755)
        os.chmod(self.d / "www" / "big", 0o644)
        self.backends.append(Proc(["nginx", "-c", http_conf(self.d), "-g", "daemon off;"], "nginx"))
        for port in (*REDIS_PORTS, IPERF_PORT, HTTP_PORT, HTTP_PORT_2):
            wait_port(port)

    def start_proxies(self):
        maxconn = self.args.max_conns + 200
        self.proxies = {
            "haproxy": Proc(["haproxy", "-db", "-f", haproxy_conf(self.d, maxconn)], "haproxy"),
            "nginx": Proc(["nginx", "-c", nginx_conf(self.d, maxconn), "-g", "daemon off;"], "nginx"),
            "sluice": Proc([str(SLUICE), "-c", sluice_conf(self.d)], "sluice", env={**os.environ, "RUST_LOG": "warn"}),
        }
        self.logged = Proc([str(SLUICE), "-c", sluice_logged_conf(self.d)], "sluice",
                           env={**os.environ, "RUST_LOG": "warn"})
        wait_port(ALOG_PATHS["sluice-logged"])
        for name in self.proxies:
            for port in (*PATHS[name], *TLS_PATHS[name], *HTTP_PATHS[name]):
                wait_port(port)
        for port in EDGE_PATHS.values():
            wait_port(port)
        time.sleep(0.5)  # let NGINX fork its worker and every health check settle

    def stop_proxies(self):
        for p in self.proxies.values():
            p.stop()
        self.proxies = {}
        if self.logged:
            self.logged.stop()
            self.logged = None

    def stop_all(self):
        self.stop_proxies()
        for b in self.backends:
            b.stop()

    def pids(self, path):
        if path == "sluice-logged":
            return self.logged.pids()
        if path in EDGE_PATHS or path in ALOG_PATHS:
            path = "sluice"
        return self.proxies[path].pids() if path in self.proxies else []

    # --- workloads -------------------------------------------------------------

    @staticmethod
    def redis_port(path):
        return {**EDGE_PATHS, **ALOG_PATHS}.get(path) or PATHS[path][0]

    def redis(self, path, extra, requests, clients=50):
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.redis_port(path)), "-c", str(clients),
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

    def handshakes(self, path, kind, seconds, clients=2):
        """New TLS 1.3 handshakes per second: `clients` openssl s_time processes at once."""
        port = TLS_PATHS[path][0 if kind == "ecdsa" else 1]
        argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-tls1_3", "-time", str(seconds)]
        pids = self.pids(path)
        c0 = cpu_seconds(pids)
        runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for _ in range(clients)]
        total = 0.0
        for r in runs:
            out = r.communicate(timeout=seconds + 60)[0]
            # "N connections in T real seconds, B bytes read per connection"
            line = next(l for l in out.splitlines() if "connections in" in l and "real seconds" in l)
            n, _, _, t = line.split()[:4]
            total += int(n) / float(t)
        cpu = cpu_seconds(pids) - c0
        return {"rate": total, "cpu_per_k": cpu / (total * seconds) * 1000 if total else None}

    def tls_bulk(self, path):
        """One HTTPS download of the backend's large file through termination."""
        pids = self.pids(path)
        c0 = cpu_seconds(pids)
        out = subprocess.run(["curl", "-sS", "-k", "--tlsv1.3", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                              f"https://127.0.0.1:{TLS_PATHS[path][2]}/big"],
                             capture_output=True, text=True, timeout=300).stdout
        cpu = cpu_seconds(pids) - c0
        size, took = out.split()
        if int(size) != BULK_BYTES:
            raise RuntimeError(f"{path}: the TLS download got {size} of {BULK_BYTES} bytes")
        gbytes = int(size) / 1e9
        return {"gbps": gbytes * 8 / float(took), "cpu_per_gb": cpu / gbytes}

    def idle_tls_memory(self, path, count):
        """RSS growth of the proxy per idle TLS connection (handshake done) held through it."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        pids = self.pids(path)
        before = rss_bytes(pids)
        socks = []
        try:
            for _ in range(count):
                raw = socket.create_connection(("127.0.0.1", TLS_PATHS[path][0]))
                socks.append(ctx.wrap_socket(raw, server_hostname="bench.example.com"))
            socks[-1].sendall(b"PING\r\n")
            socks[-1].recv(16)
            time.sleep(1.0)
            after = rss_bytes(pids)
        finally:
            for s in socks:
                s.close()
        return (after - before) / count

    def idle_memory(self, path, count):
        """RSS growth of the proxy per idle connection held through it."""
        pids = self.pids(path)
        before = rss_bytes(pids)
        socks = []
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", self.redis_port(path)))
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

    def http_port(self, path, tls):
        port = HTTP_PATHS[path][1 if tls else 0]
        if port is None:
            raise ValueError(f"{path} has no TLS port")
        return port

    def http_probe(self, path, tls):
        """One GET of the small answer through `path`: a path that answers
        anything else (404, 502, ...) must not be measured."""
        port = self.http_port(path, tls)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", HTTP_SMALL)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200 or body != HTTP_SMALL_BODY:
            raise RuntimeError(f"{path}: GET {HTTP_SMALL} ({'https' if tls else 'http'}) answered "
                               f"{resp.status} {body[:80]!r}, not 200 {HTTP_SMALL_BODY!r}")

    def wrk(self, path, tls):
        """wrk, HTTP/1.1 over kept-alive connections, against the small answer."""
        a = self.args
        self.http_probe(path, tls)
        url = f"{'https' if tls else 'http'}://127.0.0.1:{self.http_port(path, tls)}{HTTP_SMALL}"
        argv = ["wrk", "-t", "1", "-c", str(a.http_connections), "-d", f"{a.http_seconds}s", "--latency", url]
        pids = self.pids(path)
        c0 = cpu_seconds(pids) if pids else 0
        out = subprocess.run(argv, capture_output=True, text=True, timeout=a.http_seconds + 120).stdout
        cpu = cpu_seconds(pids) - c0 if pids else None
        m = re.search(r"^\s*(\d+) requests in ", out, re.M)
        rate = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
        p99 = re.search(r"^\s*99(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if not (m and rate and p99):
            raise RuntimeError(f"{path}: cannot read wrk's output:\n{out}")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if bad or (errors and any(int(n) for n in errors.groups()[:3])):
            raise RuntimeError(f"{path}: wrk saw failures:\n{out}")
        if errors and int(errors.group(4)):
            log(f"{path}: wrk: {errors.group(4)} responses took longer than wrk's 2 s timeout")
        requests = int(m.group(1))
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[p99.group(2)]
        return {"rps": float(rate.group(1)), "p99": float(p99.group(1)) * scale,
                "cpu_per_mreq": cpu / requests * 1e6 if cpu is not None else None}

    def h2load(self, path):
        """h2load, HTTP/2 over TLS (ALPN h2): a few connections, several
        streams in flight on each; p99 from its per-request log."""
        a = self.args
        self.http_probe(path, True)
        log_file = self.d / f"h2load-{path}.log"
        url = f"https://127.0.0.1:{self.http_port(path, True)}{HTTP_SMALL}"
        argv = ["h2load", "-t", "1", "-c", str(a.h2_connections), "-m", str(a.h2_streams), "-D", str(a.http_seconds),
                "--log-file", str(log_file), url]
        pids = self.pids(path)
        c0 = cpu_seconds(pids)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=a.http_seconds + 120).stdout
        cpu = cpu_seconds(pids) - c0
        proto = re.search(r"^Application protocol: (\S+)", out, re.M)
        rate = re.search(r"^finished in [\d.]+s, ([\d.]+) req/s", out, re.M)
        reqs = re.search(r"^requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored, (\d+) timeout", out, re.M)
        codes = re.search(r"^status codes: (\d+) 2xx", out, re.M)
        if not (proto and rate and reqs and codes):
            raise RuntimeError(f"{path}: cannot read h2load's output:\n{out}")
        if proto.group(1) != "h2":
            raise RuntimeError(f"{path}: h2load negotiated {proto.group(1)}, not h2")
        done, succeeded, failed, errored, timeouts = (int(n) for n in reqs.groups())
        if failed or errored or timeouts or int(codes.group(1)) != done or not succeeded:
            raise RuntimeError(f"{path}: h2load saw failures:\n{out}")
        # Columns: start time (µs since the epoch), status, µs to the end of the response.
        took = sorted(int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line.strip())
        log_file.unlink()
        p99 = took[max(0, -(-len(took) * 99 // 100) - 1)] / 1e3
        return {"rps": float(rate.group(1)), "p99": p99, "cpu_per_mreq": cpu / succeeded * 1e6}

    # --- the run ----------------------------------------------------------------

    def plain(self, order, add):
        """The plain TCP workloads, each path in `order`."""
        a = self.args
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

    def edge(self, add):
        """The edge lines: sluice's plain listener against one with a 1,000-prefix
        allow list, per-source limits and PROXY v2 to the backend, same process,
        same relay hop; the order alternates per repeat."""
        a = self.args
        order = list(EDGE_PATHS)
        if len(self.edge_turns) % 2:
            order.reverse()
        self.edge_turns.append(order)
        # Several A/B rounds per repeat, each a sample of its own: one pair
        # of short runs moves by ±10% on a shared machine.
        for turn in range(a.edge_rounds):
            for path in (order if turn % 2 == 0 else order[::-1]):
                r = self.redis(path, [], a.requests)
                add("edge: PING rate (req/s)", path, r["rps"])
                add("edge: PING, sluice CPU per million requests (s)", path, r["cpu_per_mreq"])
        for turn in range(a.edge_rounds):
            for path in (order if turn % 2 == 0 else order[::-1]):
                r = self.redis(path, ["-k", "0"], a.churn_requests)
                add("edge: churn rate, new connection per request (req/s)", path, r["rps"])
                add("edge: churn, sluice CPU per million connections (s)", path, r["cpu_per_mreq"])

    def access_log(self, add):
        """The access-log lines: the same sluice with and without `access_log`
        (JSON to a file); the order alternates per repeat."""
        a = self.args
        order = list(ALOG_PATHS)
        if len(self.edge_turns) % 2:
            order.reverse()
        log_file = self.d / "access.log"
        for path in order:
            r = self.redis(path, [], a.requests)
            add("access log: PING rate (req/s)", path, r["rps"])
            add("access log: PING, sluice CPU per million requests (s)", path, r["cpu_per_mreq"])
        for path in order:
            r = self.redis(path, ["-k", "0"], a.churn_requests)
            add("access log: churn rate, new connection per request (req/s)", path, r["rps"])
            add("access log: churn, sluice CPU per million connections (s)", path, r["cpu_per_mreq"])
        # The writer runs off the data path: let it catch up before measuring.
        size, lines = 0, 0
        for _ in range(50):
            data = log_file.read_bytes() if log_file.exists() else b""
            if data and data.endswith(b"\n") and len(data) == size:
                break
            size, lines = len(data), data.count(b"\n")
            time.sleep(0.1)
        if lines:
            add("access log: bytes per line", "sluice-logged", size / lines)

    def edge_idle(self, count, add):
        """Memory per idle connection of the two edge listeners, each in a
        fresh process (in one process, the second would reuse what the first
        freed), the order alternating per call."""
        order = list(EDGE_PATHS)
        if len(self.edge_turns) % 2:
            order.reverse()
        for path in order:
            self.stop_proxies()
            self.start_proxies()
            add(f"edge: memory per idle connection at {count} (bytes)", path, self.idle_memory(path, count))

    def tls(self, order, add):
        """The TLS workloads, each proxy in `order`."""
        a = self.args
        for kind, label in (("ecdsa", "ECDSA P-256"), ("rsa", "RSA 2048")):
            for path in order:
                m = self.handshakes(path, kind, a.handshake_seconds)
                add(f"TLS: new TLS 1.3 handshakes/s, {label}", path, m["rate"])
                add(f"TLS: proxy CPU s per 1000 handshakes, {label}", path, m["cpu_per_k"])
        for path in order:
            m = self.tls_bulk(path)
            add("TLS: bulk through termination, 1 stream (Gbit/s)", path, m["gbps"])
            add("TLS: proxy CPU s per GB through termination", path, m["cpu_per_gb"])

    def http(self, order, tls_order, add):
        """The HTTP lines, each path in `order` (`tls_order` over TLS, no direct path)."""
        a = self.args
        c = a.http_connections
        for path in order:
            m = self.wrk(path, False)
            add(f"HTTP: request rate, HTTP/1.1, {c} connections (req/s)", path, m["rps"])
            add("HTTP: p99 latency, HTTP/1.1 (ms)", path, m["p99"])
            add("HTTP: proxy CPU s per million requests, HTTP/1.1", path, m["cpu_per_mreq"])
        for path in tls_order:
            m = self.wrk(path, True)
            add(f"HTTP: request rate, HTTP/1.1 over TLS, {c} connections (req/s)", path, m["rps"])
            add("HTTP: p99 latency, HTTP/1.1 over TLS (ms)", path, m["p99"])
            add("HTTP: proxy CPU s per million requests, HTTP/1.1 over TLS", path, m["cpu_per_mreq"])
        for path in tls_order:
            m = self.h2load(path)
            add(f"HTTP: request rate, HTTP/2 over TLS, {a.h2_connections} connections × {a.h2_streams} streams "
                "(req/s)", path, m["rps"])
            add("HTTP: p99 latency, HTTP/2 over TLS (ms)", path, m["p99"])
            add("HTTP: proxy CPU s per million requests, HTTP/2 over TLS", path, m["cpu_per_mreq"])

    def run(self):
        a = self.args
        results = {}  # (metric, path) -> [values]

        def add(metric, path, value):
            if value is not None:
                results.setdefault((metric, path), []).append(value)

        order = list(PATHS)
        for r in range(a.repeats):
            order = order[1:] + order[:1]
            tls_order = [p for p in order if p in TLS_PATHS]
            log(f"repeat {r + 1}/{a.repeats}: order {order}")
            if a.http_only:
                self.http(order, tls_order, add)
                continue
            if not a.tls_only:
                self.edge(add)
                self.access_log(add)
            if a.edge_only:
                for count in a.idle_counts:
                    self.edge_idle(count, add)
                continue
            if not a.tls_only:
                self.plain(order, add)
            self.tls(tls_order, add)
            if not a.tls_only:
                self.http(order, tls_order, add)
            for count in [] if a.tls_only else a.idle_counts:
                # Fresh processes, so one run's allocator caches do not hide the next one's growth.
                self.stop_proxies()
                self.start_proxies()
                for path in order:
                    if path == "direct":
                        continue
                    add(f"memory per idle connection at {count} (bytes)", path, self.idle_memory(path, count))
                self.edge_idle(count, add)
            for count in a.tls_idle_counts:
                self.stop_proxies()
                self.start_proxies()
                for path in tls_order:
                    add(f"TLS: memory per idle TLS connection at {count} (bytes)", path,
                        self.idle_tls_memory(path, count))
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

    edge = [m for m in metrics if m.startswith("edge: ")]
    alog = [m for m in metrics if m.startswith("access log: ")]
    metrics = [m for m in metrics if not m.startswith(("edge: ", "access log: "))]
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
    # The A/B tables: the same sluice with and without one thing, same run.
    for prefix, names, (a_path, b_path), ratio_name in (
            ("edge: ", ("edge figure", "sluice, plain listener", "sluice, edge listener"),
             tuple(EDGE_PATHS), "edge / plain"),
            ("access log: ", ("access-log figure", "sluice, no access log",
                              "sluice, access log (JSON to a file)"), tuple(ALOG_PATHS), "on / off")):
        rows = edge if prefix == "edge: " else alog
        if not rows:
            continue
        lines += ["", f"| {' | '.join(names)} | {ratio_name} |", "| --- | ---: | ---: | ---: |"]
        for metric in rows:
            a_med, b_med = (statistics.median(results[(metric, p)]) if (metric, p) in results else None
                            for p in (a_path, b_path))
            ratio = f"{b_med / a_med:.3f}×" if a_med and b_med else "–"
            lines.append(f"| {metric[len(prefix):]} | {fmt(a_med)} | {fmt(b_med)} | {ratio} |")
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
    if SLUICE == SLUICE_DEFAULT.resolve():
        binary = f"sluice {commit}{' + uncommitted changes' if dirty else ''}, release build"
    else:
        built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(SLUICE.stat().st_mtime))
        kind = "release build" if SLUICE.parent.name == "release" else "build"
        binary = f"sluice `{SLUICE}` (SLUICE_BIN, {kind} of {built}; bench script at {commit})"
    return "\n".join([
        f"- machine: {os.cpu_count()} × {cpu}, {int(mem) // 1024 // 1024} GiB RAM, Linux {platform.release()}",
        f"- open-file limit per process: {soft} (hard {hard})",
        f"- {binary}, `threads: 1`",
        f"- {version(['haproxy', '-v'])} (`nbthread 1`, `option splice-auto`; HTTP: `mode http`, "
        "`http-reuse always`, `option http-keep-alive`)",
        f"- {version(['nginx', '-v'])} stream module and HTTP `proxy_pass` (`worker_processes 1`; HTTP: upstream "
        "`keepalive 64`, `proxy_http_version 1.1`)",
        f"- {version(['redis-server', '--version'])}; {version(['iperf3', '--version'])}; "
        f"{version(['wrk', '--version']).split(' [')[0]}; {version(['h2load', '--version'])}",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200_000, help="PING requests per run (x10 pipelined)")
    ap.add_argument("--churn-requests", type=int, default=20_000)
    ap.add_argument("--edge-rounds", type=int, default=3,
                    help="A/B rounds of the edge lines per repeat, each a sample (the median is over all)")
    ap.add_argument("--iperf-seconds", type=int, default=5)
    ap.add_argument("--client-counts", type=int, nargs="*", default=[500, 9000])
    ap.add_argument("--idle-counts", type=int, nargs="*", default=[500, 5000, 9000])
    ap.add_argument("--tls-idle-counts", type=int, nargs="*", default=[5000])
    ap.add_argument("--handshake-seconds", type=int, default=5)
    ap.add_argument("--http-seconds", type=int, default=5, help="length of each wrk and h2load run")
    ap.add_argument("--http-connections", type=int, default=50, help="wrk's connections (one thread)")
    ap.add_argument("--h2-connections", type=int, default=10, help="h2load's connections (one thread)")
    ap.add_argument("--h2-streams", type=int, default=10, help="h2load's streams in flight per connection")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--tls-only", action="store_true", help="only the TLS lines (for trying them)")
    only.add_argument("--edge-only", action="store_true", help="only the edge and access-log lines (for trying them)")
    only.add_argument("--http-only", action="store_true", help="only the HTTP lines (for trying them)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A proxy holds two descriptors per connection, and HAProxy with
    # splice-auto sizes a pipe (two more) per four connections up front: it
    # refuses to start when maxconn would not fit.
    limit = int((hard - 200) / 2.5)
    for counts in (args.idle_counts, args.client_counts, args.tls_idle_counts):
        too_many = [c for c in counts if c > limit]
        if too_many:
            log(f"skipping {too_many}: the open-file limit ({hard}) allows at most {limit} proxied connections")
            counts[:] = [c for c in counts if c <= limit]
    args.max_conns = max([*args.idle_counts, *args.client_counts, *args.tls_idle_counts, 50])
    if not SLUICE.exists():
        if "SLUICE_BIN" in os.environ:
            sys.exit(f"{SLUICE} (SLUICE_BIN) is missing")
        sys.exit(f"{SLUICE} is missing: run `make bench` (or cargo build --release)")
    if not (args.tls_only or args.edge_only):
        for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
            if not shutil.which(tool):
                sys.exit(f"{tool} is missing (the HTTP lines): apt-get install {package}, or `make bench-deps`")

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
- `{' '.join(['bench/bench.py', *sys.argv[1:]])}`
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
- TLS lines (no direct path): `openssl s_time -new -tls1_3`, two at once, full handshakes (no resumption) with
  X25519 key exchange; bulk is one `curl --tlsv1.3` download of a 1 GiB file from a plain NGINX HTTP backend through
  the terminating listener; idle TLS memory holds Python `ssl` connections with their handshake done.
- HTTP lines: `GET /small` (a 3-byte body) round robin over two ports of one NGINX backend process; each proxy
  keeps backend connections alive and writes X-Forwarded-For, -Proto and -Host; no access logs. HTTP/1.1 is
  `wrk -t 1 -c {args.http_connections} -d {args.http_seconds}s --latency` (direct: straight to the backend; over TLS:
  ECDSA P-256, connections kept, so handshakes barely count); HTTP/2 is `h2load -t 1 -c {args.h2_connections}
  -m {args.h2_streams} -D {args.http_seconds}` over TLS with ALPN h2 (HTTP/1.1 to the backends), p99 from its
  per-request log. Proxy CPU per million requests counts the whole client run.
"""
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
