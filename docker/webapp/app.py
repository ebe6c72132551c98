#!/usr/bin/env python3
"""The app servers of the sluice stack (docker/docker-compose.yml).

A small real web app: GET /visit writes one row through sluice's write
listener (the floating address, port 3306: the MariaDB primary) and reads
through its read listener (port 3307: the replica), each over a fresh
connection, and answers JSON naming the app and the database servers that
took the write and the read. The drills read those names to see where
traffic went.

A write is keyed by the client's request id, so retrying one is safe: a
connection lost to a balancer failover (the floating address moving under an
open connection) is retried for up to DB_RETRY_SECONDS, as an application
behind any L4 balancer pair must. Retries are counted in /stats.

GET /healthz answers 200 while the process runs (sluice's http check).
GET /visit?id=ID[&slow_ms=N] sleeps N ms first (a long request to have in
flight), then writes and reads. GET /stats: requests, retries, failures.
"""

import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pymysql

NAME = os.environ["APP_NAME"]
DB_HOST = os.environ["DB_HOST"]
WRITE_PORT = int(os.environ.get("DB_WRITE_PORT", "3306"))
READ_PORT = int(os.environ.get("DB_READ_PORT", "3307"))
RETRY_SECONDS = float(os.environ.get("DB_RETRY_SECONDS", "3"))
with open(os.environ["DB_PASSWORD_FILE"], encoding="utf-8") as f:
    PASSWORD = f.read().strip()

# Connection-level failures: can't connect, gone away, lost during a query.
# Anything else (a refused write on a read-only server, say) is an answer
# and is never retried.
RETRYABLE = {2003, 2006, 2013, 2055}

stats = {"requests": 0, "ok": 0, "failed": 0, "db_retries": 0}
stats_lock = threading.Lock()


def count(key, n=1):
    with stats_lock:
        stats[key] += n


def on_db(port, work):
    """work(cursor) on a fresh autocommit connection through sluice."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            conn = pymysql.connect(
                host=DB_HOST, port=port, user="app", password=PASSWORD,
                database="app", autocommit=True,
                connect_timeout=2, read_timeout=5, write_timeout=5)
            try:
                with conn.cursor() as cur:
                    return work(cur)
            finally:
                conn.close()
        except pymysql.err.OperationalError as e:
            code = e.args[0] if e.args else None
            if code not in RETRYABLE or time.monotonic() >= deadline:
                raise
            count("db_retries")
            time.sleep(0.1)


def visit(request_id):
    def write(cur):
        cur.execute(
            "INSERT INTO visits (request_id, app) VALUES (%s, %s)"
            " ON DUPLICATE KEY UPDATE app = app", (request_id, NAME))
        cur.execute("SELECT @@hostname")
        return cur.fetchone()[0]

    def read(cur):
        cur.execute("SELECT @@hostname, COUNT(*) FROM visits")
        return cur.fetchone()

    wrote_on = on_db(WRITE_PORT, write)
    read_on, rows = on_db(READ_PORT, read)
    return {"app": NAME, "request": request_id, "write": wrote_on,
            "read": read_on, "rows": rows}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def answer(self, status, body):
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/healthz":
            self.answer(200, {"app": NAME, "ok": True})
        elif url.path == "/stats":
            with stats_lock:
                self.answer(200, dict(stats, app=NAME))
        elif url.path == "/visit":
            count("requests")
            request_id = query.get("id", [uuid.uuid4().hex])[0][:64]
            slow_ms = min(int(query.get("slow_ms", ["0"])[0]), 10_000)
            if slow_ms > 0:
                time.sleep(slow_ms / 1000)
            try:
                body = visit(request_id)
            except pymysql.err.MySQLError as e:
                count("failed")
                self.answer(503, {"app": NAME, "request": request_id, "error": str(e)})
                return
            count("ok")
            self.answer(200, body)
        else:
            self.answer(404, {"error": "not found"})

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), Handler)
    server.daemon_threads = True
    # PID 1 in a container: SIGTERM has no default action, so stop on it.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{NAME}: serving on :{server.server_address[1]}, database at {DB_HOST}", flush=True)
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
