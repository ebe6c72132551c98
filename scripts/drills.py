#!/usr/bin/env python3
"""Failure drills against the compose stack (`make drills`).

Builds the stack's images, starts it (timing `up` to healthy), checks the
sluice image on its own, runs each drill under a bounded client load from
the client container, prints every drill's figures, and removes the stack
at the end (also on failure). Exit status 1 when any drill failed.

  image              sluice:latest alone: size, non-root, read-only root,
                     HEALTHCHECK healthy, SIGTERM exits 0
  kill-app           docker kill app1: no failed request after fall x interval
  disconnect-app     docker network disconnect app2: down within
                     fall x (interval + timeout); reconnected: back in rotation
  kill-balancer      docker kill the sluice holding the floating address: the
                     other takes it; client-visible gap under 3 s; restarted:
                     no flap back
  stop-balancer      docker stop (SIGTERM) the sluice holding the address: no
                     request in flight fails (nor any other)
  promote-replica    stop the primary, promote the replica with SQL: writes
                     follow within rise x interval; the old primary, back and
                     writable, gets no write
  restart-all        make down && make up: healthy within RESTART_LIMIT s

Usage: drills.py [--keep] [--only NAME[,NAME...]]
  --keep   leave the stack running afterwards (make down removes it)
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import stack
from stack import StackError, log

# The health-check settings the drills' bounds come from (docker/sluice-stack.yaml;
# checked against the file at start).
APP_INTERVAL, APP_TIMEOUT, APP_FALL = 1.0, 0.5, 2
DB_INTERVAL, DB_RISE = 1.0, 2
GAP_GOAL = 3.0         # client-visible gap when the address moves (issue 14)
RESTART_LIMIT = 120.0  # make down && make up, to healthy
POLL_SLACK = 0.35      # one admin poll through docker exec, at most
RATE = 40              # requests a second from the client container


def check_bounds_match_config():
    text = (stack.DOCKER_DIR / "sluice-stack.yaml").read_text()
    app = re.search(r"kind: http, path: /healthz, interval: (\w+), timeout: (\w+), rise: \d+, fall: (\d+)", text)
    want = ("1s", "500ms", str(APP_FALL))
    if not app or app.groups() != want:
        raise StackError(f"docker/sluice-stack.yaml's app check is not {want}: update drills.py")
    if "interval: 1s" not in text or f"rise: {DB_RISE}" not in text:
        raise StackError("docker/sluice-stack.yaml's database check changed: update drills.py")


class Load:
    """R requests a second for S seconds from the client container, in the background."""

    def __init__(self, duration, rate=RATE, slow_every=0, slow_ms=0):
        self.started = time.time()
        args = ["docker", "exec", stack.container("client"), "python3", "/app/load.py", "run",
                "--url", f"http://{stack.VIP}:8080", "--rate", str(rate),
                "--duration", str(duration), "--timeout", "5"]
        if slow_every:
            args += ["--slow-every", str(slow_every), "--slow-ms", str(slow_ms)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.limit = duration + 60

    def results(self):
        out, err = self.proc.communicate(timeout=self.limit)
        if self.proc.returncode != 0:
            raise StackError(f"load client failed: {err.strip()[-1000:]}")
        recs = [json.loads(line) for line in out.splitlines() if line.strip()]
        if not recs:
            raise StackError("load client returned no results")
        return recs


def at(t):
    """Sleep until wall-clock time t (the load runs on the same clock)."""
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


def poll(what, cond, limit=30.0, every=0.1):
    """Poll cond() until true; the wall-clock time of the poll that saw it."""
    deadline = time.monotonic() + limit
    while True:
        t = time.time()
        try:
            if cond():
                return t
        except (StackError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {limit:.0f}s waiting for: {what}")
        time.sleep(every)


def failed(recs):
    return [r for r in recs if not r["ok"]]


def summary(recs):
    return f"{len(recs)} requests, {len(failed(recs))} failed"


def state_on_all(pool, address, pred):
    return all(pred(stack.backend(stack.pools(s), pool, address)) for s in ("sluice1", "sluice2"))


def holder():
    holders = stack.vip_holders()
    if len(holders) != 1:
        raise StackError(f"floating address held by {holders or 'nobody'}")
    return holders[0]


def wait_both_balancers_healthy():
    """Both sluice containers healthy and both keepalived members able to
    hold the address (one MASTER, one BACKUP: none in FAULT)."""
    poll("sluice1 and sluice2 healthy, one VRRP MASTER and one BACKUP",
         lambda: all(stack.states()[s] == (True, "healthy") for s in ("sluice1", "sluice2"))
         and sorted(stack.vrrp_states().values()) == ["BACKUP", "MASTER"],
         limit=60, every=0.25)


# --- the drills -----------------------------------------------------------


def drill_image():
    size = int(stack.run(["docker", "image", "inspect", "-f", "{{.Size}}", "sluice:latest"]).strip())
    user = stack.run(["docker", "image", "inspect", "-f", "{{.Config.User}}", "sluice:latest"]).strip()
    name = f"{stack.PROJECT}-image-check"
    stack.run(["docker", "rm", "-f", name], check=False)
    cid = stack.run(["docker", "run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL",
                     "--network", "none", "sluice:latest"]).strip()
    try:
        started = time.monotonic()
        poll("the image's HEALTHCHECK to pass",
             lambda: stack.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid]).strip() == "healthy",
             limit=60, every=0.25)
        healthy_after = time.monotonic() - started
        uid = [line.split()[1] for line in
               stack.run(["docker", "top", cid, "-o", "pid,uid"]).splitlines()[1:]]
        t = time.monotonic()
        stack.run(["docker", "stop", "-t", "30", cid])
        stop_took = time.monotonic() - t
        code = stack.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", cid]).strip()
    finally:
        stack.run(["docker", "rm", "-f", cid], check=False)
    figures = {"size_mb": round(size / 1e6, 1),
               "binary": os.environ.get("SLUICE_IMAGE_PROFILE", "release"), "user": user, "process_uids": uid,
               "healthy_after_s": round(healthy_after, 1), "sigterm_exit": code,
               "stop_s": round(stop_took, 1)}
    errors = []
    profile = os.environ.get("SLUICE_IMAGE_PROFILE", "release")
    if profile == "release":
        if size >= 50e6:
            errors.append(f"image is {size / 1e6:.1f} MB, goal under 50")
    else:
        # A debug binary is three times a release one, so the 50 MB goal
        # is the release image's (`make drills`). Here: the image is the
        # runtime base plus the binary and nothing else of size.
        base = int(stack.run(["docker", "image", "inspect", "-f", "{{.Size}}",
                              "gcr.io/distroless/cc-debian12:nonroot"]).strip())
        binary = (stack.ROOT / "target" / "docker" / "sluice").stat().st_size
        extra = size - base - binary
        figures["beyond_base_and_binary_mb"] = round(extra / 1e6, 1)
        if extra >= 5e6:
            errors.append(f"image holds {extra / 1e6:.1f} MB beyond its base and the binary, goal under 5")
    if not uid or "0" in uid:
        errors.append(f"runs as uid {uid}")
    if code != "0":
        errors.append(f"SIGTERM exit code {code}")
    return figures, errors


def drill_kill_app():
    bound = APP_FALL * APP_INTERVAL
    load = Load(duration=12)
    t_kill = load.started + 3
    at(t_kill)
    stack.run(["docker", "kill", stack.container("app1")])
    t_down = poll("app1 down on both sluice instances",
                  lambda: state_on_all("app", "app1:8000", lambda b: b["state"] == "down"))
    recs = load.results()
    bad = failed(recs)
    late = [r for r in bad if r["t0"] > t_kill + bound]
    after = [r for r in recs if r["ok"] and r["t0"] > t_kill + bound]
    figures = {"load": summary(recs), "failed_before_bound": len(bad) - len(late),
               "failed_after_bound": len(late), "bound_s": bound,
               "marked_down_after_s": round(t_down - t_kill, 2),
               "served_by_after_bound": sorted({r["app"] for r in after})}
    errors = []
    if late:
        errors.append(f"{len(late)} requests failed after {bound}s, e.g. {late[0].get('err')}")
    if figures["served_by_after_bound"] != ["app2"]:
        errors.append(f"after the bound, served by {figures['served_by_after_bound']}")
    # Back to two apps for the next drill.
    stack.run(["docker", "start", stack.container("app1")])
    poll("app1 up again on both", lambda: state_on_all("app", "app1:8000", lambda b: b["up"]))
    return figures, errors


def drill_disconnect_app():
    bound = APP_FALL * (APP_INTERVAL + APP_TIMEOUT)
    app2 = stack.container("app2")
    load = Load(duration=16)
    t_cut = load.started + 3
    at(t_cut)
    stack.run(["docker", "network", "disconnect", stack.NETWORK, app2])
    t_down = poll("app2 down on both sluice instances",
                  lambda: state_on_all("app", "app2:8000", lambda b: b["state"] == "down"), every=0.05)
    at(load.started + 8)
    t_back = time.time()
    stack.run(["docker", "network", "connect", "--alias", "app2", stack.NETWORK, app2])
    t_up = poll("app2 up again on both sluice instances",
                lambda: state_on_all("app", "app2:8000", lambda b: b["up"]))
    recs = load.results()
    bad = failed(recs)
    served_again = [r for r in recs if r["ok"] and r["app"] == "app2" and r["t0"] > t_back]
    figures = {"load": summary(recs), "bound_s": bound,
               "marked_down_after_s": round(t_down - t_cut, 2),
               "back_up_after_reconnect_s": round(t_up - t_back, 2),
               "first_app2_answer_after_reconnect_s":
                   round(served_again[0]["t1"] - t_back, 2) if served_again else None,
               "failed_requests": len(bad),
               "failed_in_flight_at_cut": sum(1 for r in bad if r["t0"] <= t_cut)}
    errors = []
    if t_down - t_cut > bound + POLL_SLACK:
        errors.append(f"marked down after {t_down - t_cut:.2f}s, bound {bound}s")
    if not served_again:
        errors.append("app2 served nothing after it was reconnected")
    late = [r for r in bad if r["t0"] > t_cut + bound + POLL_SLACK]
    if late:
        errors.append(f"{len(late)} requests failed after app2 was marked down, e.g. {late[0].get('err')}")
    return figures, errors


def gap(recs, since):
    """Client-visible gap: from the first request after `since` that failed
    to the first one started after it that succeeded (0 with no failure)."""
    recs = sorted((r for r in recs if r["t0"] >= since), key=lambda r: r["t0"])
    first_bad = next((r for r in recs if not r["ok"]), None)
    if first_bad is None:
        return 0.0
    last_bad = max(r["t0"] for r in recs if not r["ok"])
    next_ok = next((r for r in recs if r["ok"] and r["t0"] > last_bad), None)
    if next_ok is None:
        return float("inf")
    return next_ok["t0"] - first_bad["t0"]


def drill_kill_balancer():
    wait_both_balancers_healthy()
    lb = holder()
    other = "lb2" if lb == "lb1" else "lb1"
    victim = stack.PAIR[lb]
    load = Load(duration=10)
    t_kill = load.started + 3
    at(t_kill)
    stack.run(["docker", "kill", stack.container(victim)])
    t_moved = poll(f"{other} to hold the floating address", lambda: stack.holds_vip(other), every=0.05)
    recs = load.results()
    bad = failed(recs)
    g = gap(recs, t_kill - 2)
    # Restarted: it must not take the address back (nopreempt).
    t_restart = time.time()
    stack.run(["docker", "start", stack.container(victim)])
    wait_both_balancers_healthy()
    ready_after = time.time() - t_restart
    calm = Load(duration=6, rate=20)
    flaps = []
    while time.time() < calm.started + 6:
        if not stack.holds_vip(other) or stack.holds_vip(lb):
            flaps.append(round(time.time() - t_restart, 2))
        time.sleep(0.5)
    calm_recs = calm.results()
    figures = {"killed": victim, "load": summary(recs), "failed_requests": len(bad),
               "gap_s": round(g, 2), "address_moved_after_s": round(t_moved - t_kill, 2),
               "restarted_ready_after_s": round(ready_after, 1),
               "after_restart": summary(calm_recs), "flaps_back": len(flaps)}
    errors = []
    if g >= GAP_GOAL:
        errors.append(f"client-visible gap {g:.2f}s, goal under {GAP_GOAL}s")
    if flaps:
        errors.append(f"the address moved back after the restart (at {flaps}s)")
    if failed(calm_recs):
        errors.append(f"{len(failed(calm_recs))} requests failed while the killed one came back")
    return figures, errors


def drill_stop_balancer():
    wait_both_balancers_healthy()
    lb = holder()
    other = "lb2" if lb == "lb1" else "lb1"
    victim = stack.PAIR[lb]
    cid = stack.container(victim)
    # Every fourth request takes 1.5 s in the app: many are in flight.
    load = Load(duration=10, slow_every=4, slow_ms=1500)
    t_stop = load.started + 3
    at(t_stop)
    t0 = time.monotonic()
    stack.run(["docker", "stop", "-t", "30", cid])
    stop_took = time.monotonic() - t0
    code = stack.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", cid]).strip()
    # Connections still open when shutdown_timeout ran out (sluice logs how
    # many it closed then): none when every connection finished by itself.
    logs = subprocess.run(["docker", "logs", "--since", f"{int(t_stop) - 1}", cid],
                          capture_output=True, text=True).stderr
    cut = sum(int(m) for m in re.findall(r"shutdown timeout \(\S+\) reached: closing (\d+)", logs))
    recs = load.results()
    in_flight = [r for r in recs if r["t0"] < t_stop < r["t1"]]
    bad = failed(recs)
    moved = stack.holds_vip(other)
    stack.run(["docker", "start", cid])
    wait_both_balancers_healthy()
    figures = {"stopped": victim, "load": summary(recs), "in_flight_at_sigterm": len(in_flight),
               "in_flight_failed": sum(1 for r in in_flight if not r["ok"]),
               "failed_requests": len(bad), "docker_stop_s": round(stop_took, 1),
               "connections_cut_at_shutdown_timeout": cut,
               "failed_at_s_after_sigterm": [round(r["t0"] - t_stop, 2) for r in bad][:8],
               "exit_code": code, "address_moved": moved}
    errors = []
    if bad:
        errors.append(f"{len(bad)} requests failed, e.g. {bad[0].get('err')}")
    if not in_flight:
        errors.append("no request was in flight at SIGTERM: the drill proved nothing")
    # Reported, not failed: in about one run in three, after kill-balancer,
    # a few connections whose clients already had their whole answer wait
    # for a last ACK until shutdown_timeout (README "The drills").
    if code != "0":
        errors.append(f"exit code {code}")
    if not moved:
        errors.append(f"{other} did not take the floating address")
    return figures, errors


def sql(service, statement):
    return stack.docker_exec(service, "mariadb", "-N", "-B", "-e", statement).strip()


def drill_promote_replica():
    bound = DB_RISE * DB_INTERVAL
    load = Load(duration=18)
    at(load.started + 3)
    t_stop = time.time()
    stack.run(["docker", "stop", "-t", "20", stack.container("db1")])
    # db1 takes writes until it has shut down; from here on it can take none.
    t_stopped = time.time()
    sql("db2", "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF;")
    t_promoted = time.time()
    t_writes = poll("writes to go to db2 on both sluice instances",
                    lambda: state_on_all("db_primary", "db2:3306", lambda b: b["active"]), every=0.05)
    # The old primary comes back, still writable: it must get nothing.
    at(load.started + 9)
    stack.run(["docker", "start", stack.container("db1")])
    poll("db1 back, refused as a second primary on both",
         lambda: all(stack.pools(s)["db_primary"]["conflicts"] >= 1
                     and stack.backend(stack.pools(s), "db_primary", "db1:3306")["role"] == "primary"
                     for s in ("sluice1", "sluice2")), limit=40)
    recs = load.results()
    bad = failed(recs)
    rows_on_old = int(sql("db1", f"SELECT COUNT(*) FROM app.visits WHERE UNIX_TIMESTAMP(at) >= {t_stopped:.3f}"))
    wrote_old = [r for r in recs if r["ok"] and r["write"] == "db1" and r["t0"] > t_promoted]
    first_on_new = min((r["t1"] for r in recs if r["ok"] and r["write"] == "db2"), default=None)
    retries = 0
    for app in ("app1", "app2"):
        retries += stack.client_json(f"http://{app}:8000/stats")["db_retries"]
    conflicts = {s: stack.pools(s)["db_primary"]["conflicts"] for s in ("sluice1", "sluice2")}
    figures = {"load": summary(recs), "failed_requests": len(bad),
               "primary_stop_took_s": round(t_stopped - t_stop, 2),
               "promoted_after_stop_s": round(t_promoted - t_stopped, 2),
               "writes_followed_after_s": round(t_writes - t_promoted, 2), "bound_s": bound,
               "first_write_on_db2_after_promotion_s":
                   round(first_on_new - t_promoted, 2) if first_on_new else None,
               "rows_written_on_old_primary": rows_on_old, "answers_naming_old_primary": len(wrote_old),
               "conflicts_reported": conflicts, "app_db_retries": retries}
    errors = []
    if t_writes - t_promoted > bound + POLL_SLACK:
        errors.append(f"writes followed after {t_writes - t_promoted:.2f}s, bound {bound}s")
    if rows_on_old or wrote_old:
        errors.append(f"writes landed on the old primary: {rows_on_old} rows")
    late = [r for r in bad if r["t0"] > t_promoted + bound + POLL_SLACK]
    if late:
        errors.append(f"{len(late)} requests failed after the writes followed, e.g. {late[0].get('err')}")
    return figures, errors


def drill_restart_all():
    t = time.monotonic()
    stack.down()
    down_took = time.monotonic() - t
    took = stack.up()
    recs = Load(duration=5, rate=20).results()
    figures = {"down_s": round(down_took, 1), "up_to_healthy_s": round(took, 1), "load_after": summary(recs)}
    errors = []
    if took > RESTART_LIMIT:
        errors.append(f"healthy only after {took:.1f}s, limit {RESTART_LIMIT}s")
    if failed(recs):
        errors.append(f"{len(failed(recs))} requests failed after the restart")
    return figures, errors


DRILLS = [
    ("kill-app", drill_kill_app),
    ("disconnect-app", drill_disconnect_app),
    ("kill-balancer", drill_kill_balancer),
    ("stop-balancer", drill_stop_balancer),
    ("promote-replica", drill_promote_replica),
    ("restart-all", drill_restart_all),
]


def main():
    args = sys.argv[1:]
    keep = "--keep" in args
    only = None
    if "--only" in args:
        only = set(args[args.index("--only") + 1].split(","))
    names = {"image"} | {n for n, _ in DRILLS}
    if only and not only <= names:
        print(f"unknown drill(s): {sorted(only - names)}; known: {sorted(names)}", file=sys.stderr)
        return 2
    if not stack.engine_answers():
        print("drills: no Docker Engine answers (docker info failed)", file=sys.stderr)
        return 1
    began = time.monotonic()
    results = []

    def run_one(name, fn):
        log(f"drill {name}")
        try:
            figures, errors = fn()
        except (StackError, subprocess.TimeoutExpired) as e:
            figures, errors = {}, [str(e)]
        results.append((name, figures, errors))
        log(f"drill {name}: {'FAILED' if errors else 'ok'} {json.dumps(figures)}")
        for e in errors:
            log(f"  {e}")

    try:
        check_bounds_match_config()
        if only is None or "image" in only:
            run_one("image", drill_image)
        stack.build()
        if stack.states():
            stack.down()
        results.append(("up", {"up_to_healthy_s": round(stack.up(), 1)}, []))
        for name, fn in DRILLS:
            if only is None or name in only:
                run_one(name, fn)
    except StackError as e:
        results.append(("setup", {}, [str(e)]))
    finally:
        if not keep:
            try:
                stack.down()
            except StackError as e:
                results.append(("down", {}, [str(e)]))
    total = time.monotonic() - began
    print("\n== drills ==")
    for name, figures, errors in results:
        print(f"{'FAIL' if errors else 'ok  '} {name:16} {json.dumps(figures)}")
        for e in errors:
            print(f"     {e}")
    n_failed = sum(1 for _, _, e in results if e)
    print(f"{len(results) - n_failed} passed, {n_failed} failed ({total:.0f}s)")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
