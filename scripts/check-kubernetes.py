#!/usr/bin/env python3
"""Validate deploy/kubernetes/ offline (`make test` runs it; no cluster).

1. Every manifest against the Kubernetes API schemas, strictly (unknown
   fields are errors), with kubernetes-validate (PyPI; it ships the schemas).
2. What the schemas cannot say: readiness asks /readyz and liveness /healthz
   on the admin port; terminationGracePeriodSeconds exceeds grace_period +
   shutdown_timeout of the ConfigMap's configuration; the NetworkPolicy lets
   nothing but Prometheus reach the admin port; the ConfigMap's
   configuration passes `sluice -t`.

Usage: check-kubernetes.py SLUICE_BINARY [KUBERNETES_VERSION]
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "deploy" / "kubernetes"
FILES = ["configmap.yaml", "deployment.yaml", "service.yaml",
         "poddisruptionbudget.yaml", "networkpolicy.yaml"]


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


def main():
    sluice = sys.argv[1]
    version = sys.argv[2] if len(sys.argv) > 2 else "1.30.0"
    problems = []
    listed = yaml.safe_load((DIR / "kustomization.yaml").read_text())["resources"]
    if sorted(listed) != sorted(FILES):
        problems.append(f"kustomization.yaml lists {listed}, expected {FILES}")

    p = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict",
                        "--no-warn", "-k", version] + [str(DIR / f) for f in FILES],
                       capture_output=True, text=True)
    print(p.stdout.strip())
    if p.returncode != 0:
        problems.append(f"schema validation failed:\n{p.stdout}{p.stderr}")

    docs = {}
    for f in FILES:
        for d in yaml.safe_load_all((DIR / f).read_text()):
            docs[(d["kind"], d["metadata"]["name"])] = d

    conf_text = docs[("ConfigMap", "sluice-config")]["data"]["sluice.yaml"]
    conf = yaml.safe_load(conf_text)
    pod = docs[("Deployment", "sluice")]["spec"]["template"]["spec"]
    box = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    admin_port = int(conf["admin"]["bind"].rsplit(":", 1)[1])
    if ports.get("admin") != admin_port:
        problems.append(f"the admin port is {admin_port} in the configuration, {ports.get('admin')} in the pod")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = box.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", admin_port):
            problems.append(f"{probe} must GET {path} on the admin port, has {get}")
    drain = seconds(conf["server"]["grace_period"]) + seconds(conf["server"]["shutdown_timeout"])
    if pod.get("terminationGracePeriodSeconds", 30) <= drain:
        problems.append(f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')} "
                        f"is not more than grace_period + shutdown_timeout ({drain}s)")
    security = box.get("securityContext", {})
    if not (security.get("readOnlyRootFilesystem") and security.get("allowPrivilegeEscalation") is False
            and pod.get("securityContext", {}).get("runAsNonRoot")):
        problems.append("the container must run as non-root with a read-only root and no privilege escalation")

    policy = docs[("NetworkPolicy", "sluice")]["spec"]
    if "Ingress" not in policy.get("policyTypes", []):
        problems.append("the NetworkPolicy does not restrict ingress")
    for rule in policy.get("ingress", []):
        rule_ports = {p.get("port") for p in rule.get("ports", [])}
        open_to_all = not rule.get("from")
        if open_to_all and (not rule_ports or admin_port in rule_ports or "admin" in rule_ports):
            problems.append(f"the NetworkPolicy opens the admin port to everyone: {rule}")
    for (kind, name), d in docs.items():
        if kind == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP":
            if any(p["port"] == admin_port for p in d["spec"]["ports"]):
                problems.append(f"Service {name} exposes the admin port outside the cluster")

    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "monitor_password"
        secret.write_text("not-a-real-password\n")
        conf_file = Path(tmp) / "sluice.yaml"
        conf_file.write_text(conf_text.replace("/run/secrets/sluice/monitor_password", str(secret)))
        t = subprocess.run([sluice, "-t", "-c", str(conf_file)], capture_output=True, text=True)
        if t.returncode != 0:
            problems.append(f"the ConfigMap's sluice.yaml fails `sluice -t`:\n{t.stderr}")

    for p in problems:
        print(f"deploy/kubernetes: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"deploy/kubernetes: {len(docs)} resources valid against Kubernetes {version} and sluice's own rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
