"""Checks of the rendered manifests that no schema expresses, and the PrometheusRule kept equal to
the rules file. Run by deploy/k8s/check inside its virtual environment (PyYAML).

  python policy.py prometheusrule [--write]   the component's PrometheusRule holds exactly the
                                              groups of deploy/prometheus/rules/order-api.rules.yml
                                              (--write regenerates it)
  python policy.py split RENDERED OUTDIR      one file per object: core kinds in OUTDIR/core/ (YAML),
                                              the Operator's (monitoring.coreos.com) in OUTDIR/crd/
                                              (JSON)
  python policy.py check RENDERED...          the rules below, per rendered overlay
"""

import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RULES = ROOT / "deploy/prometheus/rules/order-api.rules.yml"
PROMETHEUS_RULE = HERE / "components/prometheus-operator/prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/rules/order-api.rules.yml by `deploy/k8s/check --write-rules`:
# edit that file, not this one (its comments explain each rule). `make k8s-check` fails while
# the two differ.
"""


def prometheus_rule():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "order-api"},
        "spec": {"groups": groups},
    }


def check_prometheus_rule(write):
    wanted = prometheus_rule()
    if write:
        PROMETHEUS_RULE.write_text(HEADER + yaml.safe_dump(wanted, sort_keys=False, width=120))
        print(f"policy: wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
        return []
    if not PROMETHEUS_RULE.exists() or yaml.safe_load(PROMETHEUS_RULE.read_text()) != wanted:
        return [f"{PROMETHEUS_RULE.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: "
                "run deploy/k8s/check --write-rules"]
    return []


def split(rendered, outdir):
    outdir = Path(outdir)
    for kind in ("core", "crd"):
        (outdir / kind).mkdir(parents=True, exist_ok=True)
    for index, doc in enumerate(yaml.safe_load_all(Path(rendered).read_text())):
        name = f"{index:02d}-{doc['kind']}-{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # JSON for the Node validator, which has no YAML parser.
            (outdir / "crd" / f"{name}.json").write_text(json.dumps(doc))
        else:
            (outdir / "core" / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def documented_variables():
    """Every variable .env.example names, set or in a comment (`or AUTH_JWT_HS256_SECRET_FILE`)."""
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", text))


def env_of(container, config_maps):
    """Every environment variable of a container: its env, and the keys of its envFrom ConfigMaps."""
    names = {}
    for source in container.get("envFrom", []):
        data = config_maps[source["configMapRef"]["name"]]
        names.update(data)
    for variable in container.get("env", []):
        if "value" in variable:
            names[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["configMapKeyRef"]
            names[variable["name"]] = config_maps[ref["name"]][ref["key"]]
    return names


def check_rendered(path):
    problems = []
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    overlay = Path(path).stem

    def fail(message):
        problems.append(f"{overlay}: {message}")

    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ("Deployment", "Service", "Job", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "ServiceAccount"):
        if len(by_kind.get(kind, [])) != 1:
            fail(f"expected one {kind}, found {len(by_kind.get(kind, []))}")
    if problems:
        return problems
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in by_kind["ConfigMap"]}
    deployment, job = by_kind["Deployment"][0], by_kind["Job"][0]
    service, pdb = by_kind["Service"][0], by_kind["PodDisruptionBudget"][0]
    policy = by_kind["NetworkPolicy"][0]
    pod = deployment["spec"]["template"]["spec"]
    api = next(c for c in pod["containers"] if c["name"] == "order-api")
    env = env_of(api, config_maps)
    job_pod = job["spec"]["template"]["spec"]
    job_env = env_of(job_pod["containers"][0], config_maps)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    documented = documented_variables()

    # Every variable is one the service reads (named in .env.example), but the Job's own: a
    # misspelt name would be ignored by the service, silently.
    for name in sorted(set(env) | set(job_env)):
        if name not in documented and name != "MIGRATE_DATABASE_URL":
            fail(f"{name} is not a setting of the service (.env.example)")

    # Probes and shutdown.
    probes = {kind: api.get(kind, {}).get("httpGet", {}).get("path") for kind in
              ("startupProbe", "livenessProbe", "readinessProbe")}
    if probes != {"startupProbe": "/health/live", "livenessProbe": "/health/live", "readinessProbe": "/health/ready"}:
        fail(f"probes {probes}")
    grace_ms = int(env.get("SHUTDOWN_GRACE_MS", "8000"))
    pause = api.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= grace_ms + pause * 1000:
        fail(f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')} is not more than "
             f"SHUTDOWN_GRACE_MS {grace_ms} ms + preStop {pause} s")
    startup = api["startupProbe"]
    if startup["periodSeconds"] * startup["failureThreshold"] * 1000 <= int(env.get("DB_STARTUP_TIMEOUT_MS", "60000")):
        fail("the startup probe gives up before DB_STARTUP_TIMEOUT_MS")

    # Who runs it and how.
    for name, spec in (("Deployment", pod), ("Job", job_pod)):
        context = spec.get("securityContext", {})
        if not context.get("runAsNonRoot") or context.get("runAsUser", 0) == 0:
            fail(f"{name} pods may run as root")
        for container in spec["containers"]:
            own = container.get("securityContext", {})
            if not own.get("readOnlyRootFilesystem") or own.get("allowPrivilegeEscalation", True):
                fail(f"{name} container {container['name']}: root filesystem writable or privilege escalation allowed")
            if own.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(f"{name} container {container['name']}: capabilities not all dropped")
            resources = container.get("resources", {})
            if not resources.get("requests") or not resources.get("limits", {}).get("memory"):
                fail(f"{name} container {container['name']}: no resource requests or memory limit")

    # Migrations: by the Job only.
    if env.get("MIGRATE_ON_START") != "false":
        fail("the Deployment's pods must run with MIGRATE_ON_START=false")
    if job_pod["containers"][0].get("args") != ["migrate"]:
        fail("the Job does not run `order-api migrate`")

    # Secrets as files, from the mounted Secret, never as values.
    mounts = {m["mountPath"]: m["name"] for m in api.get("volumeMounts", [])}
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for variable in ("OPERATOR_TOKEN_FILE", "DB_PASSWORD_FILE", "AUTH_JWT_HS256_SECRET_FILE"):
        path = env.get(variable, "")
        folder = str(Path(path).parent)
        if mounts.get(folder) not in secret_volumes:
            fail(f"{variable}={path!r} is not in a mounted Secret")
    for variable in ("OPERATOR_TOKEN", "DB_PASSWORD", "AUTH_JWT_HS256_SECRET"):
        if variable in env:
            fail(f"{variable} given as a value: use {variable}_FILE")
    for url_name in ("DATABASE_URL",):
        for name, variables in (("Deployment", env), ("Job", job_env)):
            if re.search(r"://[^/@]*:[^/@]*@", variables.get(url_name, "")):
                fail(f"{name}'s {url_name} holds a password: it comes from DB_PASSWORD_FILE")

    # The production overlay follows a failover: several hosts, the writable one.
    if overlay == "production":
        for name, variables in (("Deployment", env), ("Job", job_env)):
            url = variables.get("DATABASE_URL", "")
            hosts = url.split("://", 1)[-1].split("@", 1)[-1].split("/", 1)[0].split(",")
            if len(hosts) < 2 or "target_session_attrs=read-write" not in url:
                fail(f"{name}'s DATABASE_URL is not multi-host with target_session_attrs=read-write: {url}")

    # Selectors that select what they mean to.
    def selects(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        fail("the Deployment's selector does not select its pods")
    if not selects(service["spec"]["selector"], pod_labels):
        fail("the Service does not select the Deployment's pods")
    if selects(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"]):
        fail("the Service selects the migration Job's pod")
    if not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        fail("the PodDisruptionBudget does not cover the Deployment's pods")
    if not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels):
        fail("the NetworkPolicy does not apply to the Deployment's pods")
    ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    if service["spec"]["ports"][0]["targetPort"] not in ports:
        fail("the Service's targetPort is not a container port")
    for monitor in by_kind.get("ServiceMonitor", []):
        if not selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]):
            fail("the ServiceMonitor does not select the Service")
        if {e["port"] for e in monitor["spec"]["endpoints"]} - {p["name"] for p in service["spec"]["ports"]}:
            fail("the ServiceMonitor scrapes a port the Service does not name")
    if deployment["spec"]["replicas"] < 2:
        fail("fewer than 2 replicas: the PodDisruptionBudget would block every drain")
    return problems


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command == "prometheusrule":
        problems = check_prometheus_rule("--write" in argv)
    elif command == "split":
        split(argv[2], argv[3])
        return 0
    elif command == "check":
        problems = [p for path in argv[2:] for p in check_rendered(path)]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"policy: {problem}", file=sys.stderr)
    if not problems and command == "check":
        print(f"policy: OK ({', '.join(Path(p).stem for p in argv[2:])})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
