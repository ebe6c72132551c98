#!/usr/bin/env python3
"""The compose stack of docker/docker-compose.yml: build, up, down, and
waiting until it is healthy. `make up` / `make down` run this;
scripts/drills.py uses it as a library.

  stack.py build   the stack's images (sluice:latest must exist: make image)
  stack.py up      start it and wait until healthy; prints the time it took
  stack.py down    remove its containers, network, volumes and secrets
  stack.py status  who holds the floating address, each container's health

Healthy means: every container with a health check says so, exactly one
keepalived member holds the floating address (one MASTER, one BACKUP), a request through it reaches
an app that writes on the primary and reads on the replica, and Prometheus
scrapes both sluice instances with the alert rules loaded.

Environment: SLUICE_STACK_PROJECT (compose project, default sluice-stack),
SLUICE_NET (first three octets of the network, default 172.30.14).
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
SECRETS_DIR = DOCKER_DIR / "secrets"
SECRET_NAMES = ("monitor_password", "app_password", "repl_password", "admin_token")
PROJECT = os.environ.get("SLUICE_STACK_PROJECT", "sluice-stack")
NET = os.environ.get("SLUICE_NET", "172.30.14")
VIP = f"{NET}.200"
NETWORK = f"{PROJECT}_sluice"
CHECKED = ("sluice1", "sluice2", "app1", "app2", "db1", "db2", "prometheus")
SERVICES = CHECKED + ("lb1", "lb2", "client")
PAIR = {"lb1": "sluice1", "lb2": "sluice2"}


class StackError(Exception):
    """Something about the stack is not as it must be."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args, check=True, quiet=False, timeout=300):
    """Run a command; its stdout as text."""
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise StackError(f"`{' '.join(args)}` failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    if not quiet and p.stderr.strip() and p.returncode != 0:
        print(p.stderr.strip(), file=sys.stderr)
    return p.stdout


_compose = None


def compose_cmd():
    """`docker compose` (v2) where it exists, else `docker-compose` (v1)."""
    global _compose
    if _compose is None:
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True)
        base = ["docker", "compose"] if v2.returncode == 0 else ["docker-compose"]
        _compose = base + ["-p", PROJECT, "-f", str(COMPOSE_FILE)]
    return _compose


def compose(*args, timeout=900):
    env = dict(os.environ, SLUICE_NET=NET)
    p = subprocess.run(compose_cmd() + list(args), capture_output=True, text=True,
                       env=env, timeout=timeout)
    if p.returncode != 0:
        raise StackError(f"compose {' '.join(args)} failed: {(p.stdout + p.stderr).strip()[-3000:]}")
    return p.stdout


def engine_answers():
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def container(service):
    """The container id of a service (running or not)."""
    out = run(["docker", "ps", "-aq",
               "--filter", f"label=com.docker.compose.project={PROJECT}",
               "--filter", f"label=com.docker.compose.service={service}"]).split()
    if len(out) != 1:
        raise StackError(f"service {service}: {len(out)} containers")
    return out[0]


def states():
    """service -> (running, health or None) for every container of the stack."""
    ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"]).split()
    if not ids:
        return {}
    out = run(["docker", "inspect", "-f",
               '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Running}} '
               '{{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}'] + ids)
    result = {}
    for line in out.splitlines():
        service, running, health = line.split()
        result[service] = (running == "true", None if health == "-" else health)
    return result


def docker_exec(service, *args, timeout=30, check=True):
    return run(["docker", "exec", container(service)] + list(args), check=check, timeout=timeout)


def holds_vip(lb):
    try:
        out = docker_exec(lb, "ip", "-o", "-4", "addr", "show", "dev", "eth0", timeout=10)
    except StackError:
        return False
    return any(line.split()[3].split("/")[0] == VIP for line in out.splitlines() if len(line.split()) > 3)


def vip_holders():
    return [lb for lb in PAIR if holds_vip(lb)]


def vrrp_state(lb):
    """MASTER, BACKUP, FAULT or STOP, as keepalived's notify script wrote it."""
    try:
        return docker_exec(lb, "cat", "/run/vrrp/state", timeout=10).strip()
    except StackError:
        return "UNKNOWN"


def vrrp_states():
    return {lb: vrrp_state(lb) for lb in PAIR}


def client_get(url, timeout=5):
    """GET from inside the network (the client container): (status, body)."""
    out = run(["docker", "exec", container("client"), "python3", "/app/load.py", "get", url,
               "--timeout", str(timeout)], check=False, timeout=timeout + 20)
    status, _, body = out.partition("\n")
    try:
        return int(status), body
    except ValueError:
        return 0, out


def client_json(url, timeout=5):
    status, body = client_get(url, timeout)
    if status != 200:
        raise StackError(f"GET {url}: {status} {body[:200]}")
    return json.loads(body)


def pools(instance):
    """/api/v1/pools of sluice1 or sluice2 (its admin listener, on the network only)."""
    return client_json(f"http://{instance}:9100/api/v1/pools")["pools"]


def backend(pools_json, pool, address):
    for b in pools_json[pool]["backends"]:
        if b["address"] == address:
            return b
    raise StackError(f"pool {pool} has no backend {address}")


def ensure_secrets():
    """Random passwords for the stack, made once: mode 0644 files (the
    containers' unprivileged users read them) in a 0700 folder git ignores."""
    SECRETS_DIR.mkdir(mode=0o700, exist_ok=True)
    for name in SECRET_NAMES:
        f = SECRETS_DIR / name
        if not f.exists():
            f.write_text(secrets.token_urlsafe(24) + "\n")
            f.chmod(0o644)


def build():
    if run(["docker", "image", "ls", "-q", "sluice:latest"]).strip() == "":
        raise StackError("sluice:latest is missing: run `make image` first")
    log("building the stack's images (cached after the first time)")
    compose("build", "-q")


def problems():
    """Why the stack is not healthy yet; empty when it is."""
    why = []
    st = states()
    for s in SERVICES:
        running, health = st.get(s, (False, None))
        if not running:
            why.append(f"{s} not running")
        elif s in CHECKED and health != "healthy":
            why.append(f"{s} {health}")
    if why:
        return why
    holders = vip_holders()
    if len(holders) != 1:
        return [f"floating address held by {holders or 'nobody'}"]
    vrrp = vrrp_states()
    if sorted(vrrp.values()) != ["BACKUP", "MASTER"]:
        return [f"VRRP states {vrrp}: one MASTER and one BACKUP wanted"]
    status, body = client_get(f"http://{VIP}:8080/visit?id=healthy-{time.time_ns()}")
    if status != 200:
        return [f"request through {VIP}:8080: {status} {body[:200]}"]
    try:
        targets = client_json("http://prometheus:9090/api/v1/targets")["data"]["activeTargets"]
        rules = client_json("http://prometheus:9090/api/v1/rules")["data"]["groups"]
    except (StackError, ValueError, KeyError) as e:
        return [f"prometheus: {e}"]
    up = sorted(t["labels"]["instance"] for t in targets if t["health"] == "up")
    if up != ["sluice1:9100", "sluice2:9100"]:
        return [f"prometheus scrapes {up}"]
    if not any(g["name"] == "sluice" and len(g["rules"]) > 0 for g in rules):
        return ["prometheus has no sluice alert rules"]
    return []


def wait_healthy(limit=240):
    """Poll until healthy; the seconds it took. Raises with the reasons after `limit`."""
    start = time.monotonic()
    why = ["not checked"]
    while time.monotonic() - start < limit:
        why = problems()
        if not why:
            return time.monotonic() - start
        time.sleep(0.25)
    raise StackError(f"not healthy after {limit}s: {'; '.join(why)}")


def up():
    """Start the stack; seconds from `compose up` to healthy."""
    ensure_secrets()
    start = time.monotonic()
    log(f"starting the stack (project {PROJECT}, floating address {VIP})")
    compose("up", "-d", "--no-build")
    wait_healthy()
    took = time.monotonic() - start
    log(f"healthy {took:.1f}s after `up`: {VIP} held by {vip_holders()[0]}")
    return took


def down():
    log("removing the stack")
    compose("down", "-v", "--remove-orphans", "-t", "30")
    if SECRETS_DIR.exists():
        shutil.rmtree(SECRETS_DIR)


def status():
    for s, (running, health) in sorted(states().items()):
        print(f"{s:12} {'running' if running else 'stopped':8} {health or ''}")
    print(f"floating address {VIP}: {vip_holders() or 'nobody'}; VRRP {vrrp_states()}")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        if cmd == "build":
            build()
        elif cmd == "up":
            build()
            up()
        elif cmd == "down":
            down()
        elif cmd == "status":
            status()
        else:
            print(__doc__)
            return 2
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
