"""The container image (Dockerfile, .dockerignore) and the Kubernetes manifests (deploy/kubernetes).

Checked everywhere without a cluster or a Docker engine: the manifests each overlay renders (kubectl's
built-in kustomize, `kubectl kustomize deploy/kubernetes/overlays/<cluster>`, what `kubectl apply -k`
applies) against the Kubernetes schemas (kubernetes-validate, strict), the Deployment's production facts
in each, the Dockerfile with hadolint-like rules written here. Each check is a function that asserts;
each is also run on a broken copy (MUTATIONS, DOCKERFILE_MUTATIONS) to show it can fail. Building and
running the image needs a Docker engine (skipped without one, as tests/test_compose.py does).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshplane.policy import validate
from tests.conftest import docker_engine, required_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
# One overlay per Kubernetes cluster meshplane runs in, named after the cluster's id (--local-cluster).
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_POLICY = ROOT / "deploy" / "examples" / "policy.yaml"

NAMESPACE = "meshplane-system"
IMAGE_REPOSITORY = "ghcr.io/meshplane/meshplane"
XDS_PORT, HTTP_PORT = 18000, 18001
# kubernetes-validate 1.37 bundles the schemas of Kubernetes 1.25 to 1.37: the newest it knows, and an
# older release the manifests must still fit (matchLabelKeys of topologySpreadConstraints: on from 1.27).
KUBERNETES_VERSIONS = ("1.30", "1.37")
# What the Deployment runs `meshplane serve` with (docs/deploying.md), besides the overlay's --local-cluster.
SERVE_ARGS = {
    "--remote-secrets": NAMESPACE,
    "--policy": "/etc/meshplane/policy/policy.yaml",
    "--ads": f"0.0.0.0:{XDS_PORT}",
    "--http": f"0.0.0.0:{HTTP_PORT}",
    "--tls-cert": "/etc/meshplane/tls/tls.crt",
    "--tls-key": "/etc/meshplane/tls/tls.key",
    "--client-ca": "/etc/meshplane/tls/ca.crt",
}
TLS_SECRET = "meshplane-tls"
POLICY_CONFIGMAP = "meshplane-policy"

Doc = dict[str, Any]


# ---- the manifests ----------------------------------------------------------------------------------------------

def kubectl() -> str:
    return required_tool("kubectl", why="its built-in kustomize (`kubectl kustomize`) renders the overlays, "
                                        "as `kubectl apply -k` does")


@functools.cache
def _rendered(overlay: str) -> tuple[Doc, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize deploy/kubernetes/overlays/{overlay}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def render(overlay: str) -> list[Doc]:
    """Every document the overlay renders to, as `kubectl apply -k deploy/kubernetes/overlays/<overlay>` applies."""
    return copy.deepcopy(list(_rendered(overlay)))


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def docs(overlay: str) -> list[Doc]:
    return render(overlay)


def one(docs: list[Doc], kind: str, name: str = "meshplane") -> Doc:
    found = [d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in the rendered manifests, found {len(found)}"
    return found[0]


def deployment(docs: list[Doc]) -> Doc:
    return one(docs, "Deployment")


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = deployment(docs)["spec"]["template"]["spec"]
    return spec


def pod_labels(docs: list[Doc]) -> dict[str, str]:
    labels: dict[str, str] = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    return labels


def container(docs: list[Doc]) -> Doc:
    found: list[Doc] = [c for c in pod_spec(docs)["containers"] if c["name"] == "meshplane"]
    assert len(found) == 1, "the Deployment has one container named meshplane"
    return found[0]


def selects(match_labels: dict[str, str] | None, labels: dict[str, str]) -> bool:
    """A non-empty matchLabels selector that the labels satisfy."""
    return bool(match_labels) and all(labels.get(k) == v for k, v in (match_labels or {}).items())


def container_port(docs: list[Doc], port: int | str) -> int:
    """A port of the container by number or by name, as a probe or a Service's targetPort names it."""
    ports = {p["containerPort"]: p for p in container(docs)["ports"]}
    if isinstance(port, int):
        assert port in ports, f"port {port} is not a port of the container"
        return port
    named = [p["containerPort"] for p in ports.values() if p.get("name") == port]
    assert named, f"no container port is named {port!r}"
    return int(named[0])


def serve_args(docs: list[Doc]) -> tuple[list[str], dict[str, str | None]]:
    """(the flags before `serve`, {flag: value} after it). The manifest writes each flag as one `--flag=value`."""
    args = list(container(docs).get("args", []))
    assert "serve" in args, f"the container does not run `meshplane serve`: {args}"
    i = args.index("serve")
    serve: dict[str, str | None] = {}
    for word in args[i + 1:]:
        assert word.startswith("--"), f"{word!r}: write each flag of serve as --flag=value (serve takes no operand)"
        name, sep, value = word.partition("=")
        assert name not in serve, f"{name} given twice"
        serve[name] = value if sep else None
    return args[:i], serve


@functools.cache
def cli_flags(*command: str) -> frozenset[str]:
    """The --flags that `meshplane COMMAND --help` lists."""
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "meshplane", *command, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity (500m, 2, 256Mi, 1Gi) as a number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert match and match[2] in units, f"not a quantity: {text!r}"
    return float(match[1]) * units[match[2]]


# ---- the checks (each asserts; each runs on the shipped manifests and on a broken copy) -------------------------

def check_image(docs: list[Doc]) -> None:
    c = container(docs)
    repository, _, tag = c["image"].rpartition(":")
    assert repository == IMAGE_REPOSITORY, f"the image is meshplane's ({IMAGE_REPOSITORY}), not {c['image']!r}"
    assert tag == project_version(), f"the image tag {tag!r} is not the project's version {project_version()}"
    assert c.get("imagePullPolicy") == "IfNotPresent", f"imagePullPolicy {c.get('imagePullPolicy')}"
    assert deployment(docs)["metadata"]["labels"].get("app.kubernetes.io/version") == project_version()


def check_nothing_installed_at_start(docs: list[Doc]) -> None:
    c = container(docs)
    assert "command" not in c, "a command overrides the image's ENTRYPOINT (meshplane)"
    for word in c.get("args", []):
        assert not re.search(r"\bpip3?\b|\binstall\b|&&|\bsh\b", word), f"installs or shells at start: {word!r}"


def check_serve_flags(docs: list[Doc]) -> None:
    before, serve = serve_args(docs)
    for word in before:
        assert word.partition("=")[0] in cli_flags(), f"{word!r} is not a flag of `meshplane`"
    for name in serve:
        assert name in cli_flags("serve"), f"{name} is not a flag of `meshplane serve`"
    for name, value in SERVE_ARGS.items():
        assert serve.get(name) == value, f"serve {name}: {serve.get(name)!r}, expected {value!r}"
    local = serve.get("--local-cluster")
    assert local and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", local), f"--local-cluster {local!r}: no cluster id"
    assert "--ads-plaintext" not in serve, "--ads-plaintext: ADS is served over mTLS only"


def check_probes(docs: list[Doc]) -> None:
    c = container(docs)
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet")
        assert get, f"no {probe} httpGet"
        assert get["path"] == path, f"{probe} asks {get['path']}, expected {path}"
        assert container_port(docs, get["port"]) == HTTP_PORT, f"{probe} is not on port {HTTP_PORT}"
        assert get.get("scheme", "HTTP") == "HTTP"


def check_security(docs: list[Doc]) -> None:
    pod, c = pod_spec(docs), container(docs)
    pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    effective = {**pod_sc, **sc}  # the container's settings win
    assert effective.get("runAsNonRoot") is True, "runAsNonRoot is not true"
    assert effective.get("runAsUser") == image_uid() != 0, (
        f"runAsUser {effective.get('runAsUser')} is not the image's USER {image_uid()}")
    assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile is not RuntimeDefault"
    assert sc.get("readOnlyRootFilesystem") is True, "the root filesystem is not read-only"
    assert sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false"
    assert sc.get("privileged", False) is False, "privileged"
    caps = sc.get("capabilities", {})
    assert caps.get("drop") == ["ALL"] and not caps.get("add"), f"capabilities {caps}: drop ALL, add none"
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host), host


def check_writable_tmp(docs: list[Doc]) -> None:
    """The root filesystem is read-only; the kubernetes client writes a remote kubeconfig's certificates to /tmp."""
    mounts = {m["mountPath"]: m["name"] for m in container(docs).get("volumeMounts", [])}
    assert "/tmp" in mounts, "no writable /tmp"
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp is not an emptyDir"


def check_resources(docs: list[Doc]) -> None:
    resources = container(docs).get("resources", {})
    for resource in ("cpu", "memory"):
        request = resources.get("requests", {}).get(resource)
        limit = resources.get("limits", {}).get(resource)
        assert request is not None and limit is not None, f"{resource}: needs both a request and a limit"
        assert quantity(request) <= quantity(limit), f"{resource}: request {request} above limit {limit}"


def check_replicas_and_spread(docs: list[Doc]) -> None:
    assert deployment(docs)["spec"].get("replicas") == 2, f"replicas: {deployment(docs)['spec'].get('replicas')}"
    pod, labels = pod_spec(docs), pod_labels(docs)
    zone = [t for t in pod.get("topologySpreadConstraints", []) if t["topologyKey"] == "topology.kubernetes.io/zone"]
    assert len(zone) == 1, "expected one topology spread constraint on topology.kubernetes.io/zone"
    assert zone[0]["maxSkew"] == 1
    spread_selector = zone[0].get("labelSelector", {}).get("matchLabels")
    assert selects(spread_selector, labels), "the zone spread does not count the meshplane pods"
    preferred = pod.get("affinity", {}).get("podAntiAffinity", {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution", [])
    assert any(
        term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and selects(term["podAffinityTerm"].get("labelSelector", {}).get("matchLabels"), labels)
        for term in preferred), "no preferred pod anti-affinity on kubernetes.io/hostname"


def check_pod_disruption_budget(docs: list[Doc]) -> None:
    pdb, deploy = one(docs, "PodDisruptionBudget"), deployment(docs)
    assert pdb["metadata"]["namespace"] == deploy["metadata"]["namespace"]
    assert pdb["spec"].get("minAvailable") == 1, f"minAvailable: {pdb['spec'].get('minAvailable')}"
    assert pdb["spec"]["selector"].get("matchLabels") == deploy["spec"]["selector"]["matchLabels"], (
        "the PDB does not select what the Deployment selects")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(docs))
    assert pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"], "minAvailable >= replicas: no node can be drained"


def check_service(docs: list[Doc]) -> None:
    service = one(docs, "Service")
    assert selects(service["spec"].get("selector"), pod_labels(docs)), "the Service does not select the meshplane pods"
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {XDS_PORT, HTTP_PORT}
    for number, port in ports.items():
        target = container_port(docs, port.get("targetPort", number))
        assert target == number, f"Service port {number}: targetPort is {target}"


def check_network_policy(docs: list[Doc]) -> None:
    policy = one(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert selects(policy["spec"]["podSelector"].get("matchLabels"), pod_labels(docs)), (
        "the NetworkPolicy does not select the meshplane pods")
    assert "Ingress" in policy["spec"].get("policyTypes", [])
    admitted = set()
    for rule in policy["spec"].get("ingress", []):
        assert rule.get("ports"), "an ingress rule without ports admits every port"
        for port in rule["ports"]:
            assert "endPort" not in port, "a port range (endPort) admits more than one port"
            admitted.add((port.get("protocol", "TCP"), container_port(docs, port["port"])))
    assert admitted == {("TCP", XDS_PORT), ("TCP", HTTP_PORT)}, f"ingress admits {sorted(admitted)}"


def _mounted(docs: list[Doc], path: str, source: str, name: str) -> str:
    """The key of volume source `source` (configMap, secret) named `name` that the container sees at `path`."""
    directory, key = str(PurePosixPath(path).parent), PurePosixPath(path).name
    mounts = {m["mountPath"]: m for m in container(docs).get("volumeMounts", [])}
    assert directory in mounts, f"nothing is mounted at {directory} (for {path})"
    assert "subPath" not in mounts[directory], "a subPath mount is never updated (no reload on change)"
    volume = {v["name"]: v for v in pod_spec(docs)["volumes"]}[mounts[directory]["name"]]
    assert source in volume, f"{directory} is not a {source} volume"
    assert volume[source].get("name", volume[source].get("secretName")) == name, f"{directory} is not {name}"
    return key


def check_policy_configmap(docs: list[Doc]) -> None:
    _, serve = serve_args(docs)
    key = _mounted(docs, str(serve["--policy"]), "configMap", POLICY_CONFIGMAP)
    configmap = one(docs, "ConfigMap", POLICY_CONFIGMAP)
    assert configmap["metadata"]["namespace"] == NAMESPACE
    text = configmap.get("data", {}).get(key)
    assert text is not None, f"ConfigMap {POLICY_CONFIGMAP} has no key {key}"
    result = validate.load_policy_text(text, path=f"{POLICY_CONFIGMAP}/{key}")
    assert result.errors == (), "\n".join(str(p) for p in result.errors)


def check_policy_is_the_example(docs: list[Doc]) -> None:
    """The shipped policy is deploy/examples/policy.yaml, which `meshplane validate` accepts (kept in step)."""
    data = one(docs, "ConfigMap", POLICY_CONFIGMAP).get("data", {})
    assert data.get("policy.yaml") == EXAMPLE_POLICY.read_text(), "the ConfigMap differs from the example policy"


def check_tls_secret(docs: list[Doc]) -> None:
    _, serve = serve_args(docs)
    for flag, expected in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--client-ca", "ca.crt")):
        assert _mounted(docs, str(serve[flag]), "secret", TLS_SECRET) == expected, flag


def check_no_secret_data(docs: list[Doc]) -> None:
    """No key material is shipped: Secrets here are filled by Kubernetes (a token), or not shipped at all."""
    for doc in docs:
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"Secret {doc['metadata']['name']} has data"
            assert doc["metadata"]["name"] != TLS_SECRET, "meshplane-tls comes from cert-manager or the operator"


def check_service_account(docs: list[Doc]) -> None:
    name = pod_spec(docs).get("serviceAccountName")
    assert name == "meshplane", f"serviceAccountName {name!r}, not rbac-control-plane.yaml's meshplane"
    assert one(docs, "ServiceAccount", name)["metadata"]["namespace"] == NAMESPACE
    assert pod_spec(docs).get("automountServiceAccountToken", True), (
        "automountServiceAccountToken is off: the local cluster is read with the token")
    bound = {b["metadata"]["name"] for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
             and {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE} in b["subjects"]}
    assert {"meshplane-local-reader", "meshplane-remote-secrets"} <= bound, f"bindings of the ServiceAccount: {bound}"


def check_namespaces(docs: list[Doc]) -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    assert one(docs, "Namespace", NAMESPACE)
    for doc in docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


CHECKS = [check_image, check_nothing_installed_at_start, check_serve_flags, check_probes, check_security,
          check_writable_tmp, check_resources, check_replicas_and_spread, check_pod_disruption_budget, check_service,
          check_network_policy, check_policy_configmap, check_policy_is_the_example, check_tls_secret,
          check_no_secret_data, check_service_account, check_namespaces]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_manifests_pass(check: Callable[[list[Doc]], None], docs: list[Doc]) -> None:
    check(docs)


# ---- each check fails on a manifest broken for it --------------------------------------------------------------

Mutation = Callable[[list[Doc]], None]
_DELETE = object()


def _set(kind: str, path: str, value: Any, name: str = "meshplane") -> Mutation:
    """Set (or with _DELETE remove) the dotted `path` (list indexes as numbers) of one document."""
    def mutate(docs: list[Doc]) -> None:
        target: Any = one(docs, kind, name)
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list) and last == len(target):
            target.append(value)
        else:
            target[last] = value
    return mutate


def _args(change: Callable[[list[str]], list[str]]) -> Mutation:
    def mutate(docs: list[Doc]) -> None:
        c = container(docs)
        c["args"] = change(list(c["args"]))
    return mutate


def _policy(text: str) -> Mutation:
    def mutate(docs: list[Doc]) -> None:
        one(docs, "ConfigMap", POLICY_CONFIGMAP)["data"]["policy.yaml"] = text
    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(docs: list[Doc]) -> None:
        for m in mutations:
            m(docs)
    return mutate


_C = "spec.template.spec.containers.0"
_POD = "spec.template.spec"
MUTATIONS: list[tuple[Callable[[list[Doc]], None], str, Mutation]] = [
    (check_image, "python base image", _set("Deployment", f"{_C}.image", "python:3.11-slim")),
    (check_image, "latest tag", _set("Deployment", f"{_C}.image", f"{IMAGE_REPOSITORY}:latest")),
    (check_image, "pull always", _set("Deployment", f"{_C}.imagePullPolicy", "Always")),
    (check_nothing_installed_at_start, "pip install at start", _both(
        _set("Deployment", f"{_C}.command", ["sh", "-c"]),
        _set("Deployment", f"{_C}.args", ["pip install --no-cache-dir meshplane && exec meshplane serve"]))),
    (check_nothing_installed_at_start, "pip in args", _args(lambda a: ["pip", "install", "meshplane", *a])),
    (check_serve_flags, "unknown flag", _args(lambda a: [*a, "--no-such-flag=1"])),
    (check_serve_flags, "unknown global flag", _args(lambda a: ["--verbose", *a])),
    (check_serve_flags, "missing --client-ca", _args(lambda a: [w for w in a if not w.startswith("--client-ca")])),
    (check_serve_flags, "plaintext ADS", _args(lambda a: [*a, "--ads-plaintext=0.0.0.0:18002"])),
    (check_serve_flags, "flag and value as two words", _args(
        lambda a: [*a[:a.index("serve") + 1], "--local-cluster", "cluster-1", *a[a.index("serve") + 2:]])),
    (check_serve_flags, "no --local-cluster", _args(lambda a: [w for w in a if not w.startswith("--local-cluster")])),
    (check_serve_flags, "empty --local-cluster", _args(
        lambda a: [("--local-cluster=" if w.startswith("--local-cluster") else w) for w in a])),
    (check_serve_flags, "no serve", _args(lambda a: [w for w in a if w != "serve"])),
    (check_probes, "readiness on /healthz", _set("Deployment", f"{_C}.readinessProbe.httpGet.path", "/healthz")),
    (check_probes, "liveness on the xDS port", _set("Deployment", f"{_C}.livenessProbe.httpGet.port", XDS_PORT)),
    (check_probes, "no liveness", _set("Deployment", f"{_C}.livenessProbe", _DELETE)),
    (check_security, "writable root", _set("Deployment", f"{_C}.securityContext.readOnlyRootFilesystem", False)),
    (check_security, "root user", _set("Deployment", f"{_C}.securityContext.runAsUser", 0)),
    (check_security, "not the image's user", _set("Deployment", f"{_C}.securityContext.runAsUser", 1000)),
    (check_security, "runAsNonRoot off", _set("Deployment", f"{_C}.securityContext.runAsNonRoot", False)),
    (check_security, "escalation", _set("Deployment", f"{_C}.securityContext.allowPrivilegeEscalation", True)),
    (check_security, "capabilities kept", _set("Deployment", f"{_C}.securityContext.capabilities", {"drop": []})),
    (check_security, "capability added", _set("Deployment", f"{_C}.securityContext.capabilities.add", ["NET_ADMIN"])),
    (check_security, "no seccomp", _both(_set("Deployment", f"{_C}.securityContext.seccompProfile", _DELETE),
                                         _set("Deployment", f"{_POD}.securityContext.seccompProfile", _DELETE))),
    (check_security, "host network", _set("Deployment", f"{_POD}.hostNetwork", True)),
    (check_writable_tmp, "no /tmp", _set("Deployment", f"{_C}.volumeMounts.2", _DELETE)),
    (check_resources, "no limits", _set("Deployment", f"{_C}.resources.limits", _DELETE)),
    (check_resources, "request above limit", _set("Deployment", f"{_C}.resources.requests.memory", "2Gi")),
    (check_replicas_and_spread, "one replica", _set("Deployment", "spec.replicas", 1)),
    (check_replicas_and_spread, "spread on hosts only", _set(
        "Deployment", f"{_POD}.topologySpreadConstraints.0.topologyKey", "kubernetes.io/hostname")),
    (check_replicas_and_spread, "spread counts other pods", _set(
        "Deployment", f"{_POD}.topologySpreadConstraints.0.labelSelector.matchLabels", {"app": "other"})),
    (check_replicas_and_spread, "no anti-affinity", _set("Deployment", f"{_POD}.affinity", _DELETE)),
    (check_pod_disruption_budget, "selects other pods", _set(
        "PodDisruptionBudget", "spec.selector.matchLabels", {"app": "other"})),
    (check_pod_disruption_budget, "blocks every drain", _set("PodDisruptionBudget", "spec.minAvailable", 2)),
    (check_pod_disruption_budget, "no PDB", lambda docs: docs.remove(one(docs, "PodDisruptionBudget"))),
    (check_service, "selects nothing", _set("Service", "spec.selector", {"app": "other"})),
    (check_service, "wrong target port", _set("Service", "spec.ports.0.targetPort", HTTP_PORT)),
    (check_network_policy, "admits ssh", _set("NetworkPolicy", "spec.ingress.0.ports.2", {"port": 22})),
    (check_network_policy, "admits every port", _set("NetworkPolicy", "spec.ingress.0.ports", _DELETE)),
    (check_network_policy, "a port moved", _set("NetworkPolicy", "spec.ingress.0.ports.1.port", 18002)),
    (check_network_policy, "UDP", _set("NetworkPolicy", "spec.ingress.0.ports.0.protocol", "UDP")),
    (check_network_policy, "selects other pods", _set("NetworkPolicy", "spec.podSelector.matchLabels", {"x": "y"})),
    (check_policy_configmap, "invalid policy", _policy("apiVersion: meshplane.io/v1\ndefaults: {bogus: 1}\n")),
    (check_policy_is_the_example, "edited policy", _policy(EXAMPLE_POLICY.read_text().replace("5m", "10m"))),
    (check_policy_configmap, "policy path not the mount", _args(
        lambda a: [w.replace("/policy/policy.yaml", "/policy.yaml") for w in a])),
    (check_policy_configmap, "another ConfigMap", _set(
        "Deployment", f"{_POD}.volumes.0.configMap.name", "other")),
    (check_tls_secret, "another Secret", _set("Deployment", f"{_POD}.volumes.1.secret.secretName", "other")),
    (check_tls_secret, "key path not the mount", _args(
        lambda a: [w.replace("/tls/tls.key", "/tls.key") for w in a])),
    (check_no_secret_data, "key material shipped", lambda docs: docs.append({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": TLS_SECRET, "namespace": NAMESPACE}, "data": {"tls.key": "LS0t"}})),
    (check_service_account, "default ServiceAccount", _set("Deployment", f"{_POD}.serviceAccountName", "default")),
    (check_service_account, "no token", _set("Deployment", f"{_POD}.automountServiceAccountToken", False)),
    (check_namespaces, "default namespace", _set("Service", "metadata.namespace", "default")),
]


def _mutation_id(m: tuple[Callable[..., None], str, Mutation]) -> str:
    return f"{m[0].__name__}-{m[1].replace(' ', '-')}"


@pytest.mark.parametrize(("check", "what", "mutate"), MUTATIONS, ids=[_mutation_id(m) for m in MUTATIONS])
def test_each_check_fails_on_a_broken_manifest(
        check: Callable[[list[Doc]], None], what: str, mutate: Mutation, docs: list[Doc]) -> None:
    mutate(docs)
    with pytest.raises(AssertionError):
        check(docs)


def test_every_check_has_a_mutation() -> None:
    assert {m[0] for m in MUTATIONS} == set(CHECKS)


# ---- the Kubernetes schemas -------------------------------------------------------------------------------------

def base_files() -> list[str]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return list(kustomization["resources"])


def test_the_manifests_are_the_expected_files() -> None:
    assert base_files() == ["rbac-remote-reader.yaml", "rbac-control-plane.yaml", "policy-configmap.yaml",
                            "meshplane.yaml"]
    assert {p.name for p in BASE.glob("*.yaml")} == {"kustomization.yaml", *base_files()}, "a base file not in use"
    assert OVERLAYS == ["cluster-1", "cluster-2"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(overlay: str, version: str) -> None:
    """Strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would."""
    docs = render(overlay)
    assert docs and all(doc.get("apiVersion") and doc.get("kind") for doc in docs)
    problems = []
    for doc in docs:
        try:
            assert kubernetes_validate.validate(doc, version, strict=True) == version
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
    assert problems == [], f"overlays/{overlay}, Kubernetes {version}:\n" + "\n".join(problems)


def test_each_overlay_is_the_base_for_its_own_cluster(overlay: str) -> None:
    """What `kubectl apply -k overlays/<id>` applies: every base document, --local-cluster=<id> added, nothing else."""
    docs = render(overlay)
    _, serve = serve_args(docs)
    local = serve.get("--local-cluster")
    assert local == overlay, f"overlays/{overlay} runs --local-cluster={local}"
    base = [doc for name in base_files() for doc in yaml.safe_load_all((BASE / name).read_text()) if doc is not None]
    args = container(base)["args"]
    assert not any(a.startswith("--local-cluster") for a in args), "the base names a cluster"
    args.append(f"--local-cluster={overlay}")
    key = lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])  # noqa: E731
    assert sorted(map(json.dumps, _normalised(docs, key))) == sorted(map(json.dumps, _normalised(base, key)))


def _normalised(docs: list[Doc], key: Callable[[Doc], tuple[str, str, str]]) -> list[Doc]:
    """Sorted by kind and name; YAML 1.1's octal (0440) read as kustomize writes it (288)."""
    return sorted(json.loads(json.dumps(docs, sort_keys=True)), key=key)


@pytest.mark.parametrize(("what", "mutate"), [
    ("unknown field", _set("Deployment", f"{_C}.readOnlyRootFilesystem", True)),
    ("misspelt field", _set("Deployment", f"{_POD}.topologySpreadConstraints.0.topologykey", "zone")),
    ("wrong type", _set("Deployment", "spec.replicas", "2")),
    ("wrong enum-like shape", _set("NetworkPolicy", "spec.policyTypes", "Ingress")),
])
def test_the_schema_check_is_strict(what: str, mutate: Mutation, docs: list[Doc]) -> None:
    mutate(docs)
    broken = [d for d in docs if d["kind"] in ("Deployment", "NetworkPolicy")]
    with pytest.raises(kubernetes_validate.ValidationError):
        for doc in broken:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


# ---- the Dockerfile, linted in the manner of hadolint -----------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside a continuation) dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    if pending:
        keyword, _, args = " ".join(pending).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def stages(instructions: list[Instruction]) -> list[Stage]:
    out: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            out.append(Stage(words[0], name, []))
        elif out:
            out[-1].instructions.append(ins)
    return out


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.of("ENV"):
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])  # the legacy `ENV KEY value`
        else:
            env.update(w.partition("=")[::2] for w in words)
    return env


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


_PIP_INSTALL = re.compile(r"(\bpip3?(\.\d+)?|-m\s+pip)\s+(install|wheel|download)\b")
_BUILD_TOOLS = re.compile(r"(?<![\w-])(gcc|g\+\+|cc|clang|build-essential|make|cmake|python3?-dev)(?!\w)")
_ARCHIVE = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz|txz)$")


def dockerfile_problems(text: str) -> list[str]:
    """What hadolint (and this project) would object to, as `line N: reason`."""
    problems: list[str] = []

    def problem(ins: Instruction | None, reason: str) -> None:
        problems.append(f"line {ins.line if ins else 0}: {reason}")

    instructions = parse_dockerfile(text)
    all_stages = stages(instructions)
    if len(all_stages) < 2:
        problem(None, "not multi-stage: build in one stage, copy the result into a small final one")
        return problems
    final, builders = all_stages[-1], all_stages[:-1]
    froms = [i for i in instructions if i.keyword == "FROM"]
    names = set()
    bases = set()
    for ins, stage in zip(froms, all_stages, strict=True):
        if stage.image in names:
            pass  # FROM an earlier stage
        elif "$" in stage.image:
            problem(ins, f"FROM {stage.image}: a variable base image is not pinned")
        else:
            last = stage.image.rpartition("/")[2]
            if "@sha256:" not in stage.image and ":" not in last:
                problem(ins, f"FROM {stage.image}: untagged (pin a tag, DL3006)")
            elif last.rpartition(":")[2] == "latest":
                problem(ins, f"FROM {stage.image}: the latest tag (pin a version, DL3007)")
            bases.add(stage.image)
        if stage.name:
            names.add(stage.name)
    if len(bases) > 1:
        problem(froms[-1], f"stages on different bases {sorted(bases)}: the venv copied over needs the same Python")

    for stage in all_stages:
        env = _env(stage)
        for ins in stage.instructions:
            if ins.keyword == "RUN":
                if re.search(r"(^|[;&|]\s*)apt\s", ins.args):
                    problem(ins, "apt is for people; use apt-get (DL3027)")
                if "apt-get install" in ins.args or "apt-get -y install" in ins.args:
                    if "--no-install-recommends" not in ins.args:
                        problem(ins, "apt-get install without --no-install-recommends (DL3015)")
                    if not re.search(r"\s(-y|--yes|--assume-yes)\b", ins.args):
                        problem(ins, "apt-get install without -y (DL3014)")
                    if "rm -rf /var/lib/apt/lists" not in ins.args:
                        problem(ins, "apt-get lists not removed in the same RUN (DL3009)")
                if _PIP_INSTALL.search(ins.args) and "--no-cache-dir" not in ins.args \
                        and env.get("PIP_NO_CACHE_DIR") not in ("1", "true", "on", "yes"):
                    problem(ins, "pip keeps its cache in the image: --no-cache-dir (DL3042)")
                if re.search(r"\bsudo\b", ins.args):
                    problem(ins, "sudo (DL3004)")
                if re.search(r"(^|[;&]\s*)cd\s", ins.args):
                    problem(ins, "cd in RUN: use WORKDIR (DL3003)")
                if re.search(r"[^|]\|[^|]", ins.args) and not any(
                        "pipefail" in s.args for s in stage.of("SHELL")):
                    problem(ins, "a pipe without SHELL [... -o pipefail ...] (DL4006)")
            elif ins.keyword == "ADD":
                sources = [w for w in ins.args.split() if not w.startswith("--")][:-1]
                for source in sources:
                    if re.match(r"(https?|ftp|git)://|git@", source):
                        problem(ins, f"ADD of a URL {source}: download in a RUN you can check (DL3020)")
                    elif not _ARCHIVE.search(source):
                        problem(ins, f"ADD {source}: use COPY for files and folders (DL3020)")
            elif ins.keyword == "WORKDIR" and not ins.args.startswith(("/", "$")):
                problem(ins, f"WORKDIR {ins.args}: relative (DL3000)")
            elif ins.keyword == "MAINTAINER":
                problem(ins, "MAINTAINER is deprecated; use a LABEL (DL4000)")
        for keyword in ("CMD", "ENTRYPOINT"):
            if len(stage.of(keyword)) > 1:
                problem(stage.of(keyword)[-1], f"more than one {keyword} in a stage (DL4003/DL4004)")

    # The build stage builds meshplane from this source tree.
    copied = [w for stage in builders for ins in stage.of("COPY") if "--from" not in ins.args
              for w in ins.args.split()[:-1]]
    for needed in ("pyproject.toml", "meshplane"):
        if needed not in copied and "." not in copied:
            problem(None, f"the build stage does not copy {needed} from the source tree")

    # The final stage: what is installed, nothing else, run as a numeric non-root user, read-only.
    for ins in final.instructions:
        if ins.keyword == "RUN":
            if _PIP_INSTALL.search(ins.args) and "--no-index" not in ins.args:
                problem(ins, "the final stage installs from a package index (install wheels with --no-index)")
            tool = _BUILD_TOOLS.search(ins.args)
            if tool:
                problem(ins, f"build tools in the final stage: {tool[0]}")
        if ins.keyword in ("COPY", "ADD") and "--from" not in ins.args:
            problem(ins, "the final stage copies from the build context: only what the build stage installed")
    users = final.of("USER")
    if not users:
        problem(None, "the final stage sets no USER: it would run as root (DL3002)")
    else:
        user = users[-1].args.partition(":")[0]
        if user in ("root", "0"):
            problem(users[-1], f"USER {users[-1].args}: root (DL3002)")
        elif not user.isdigit():
            problem(users[-1], f"USER {user}: name it by number, so runAsNonRoot can check it")
    entrypoints = final.of("ENTRYPOINT")
    if not entrypoints or _exec_form(entrypoints[-1].args) != ["meshplane"]:
        problem(entrypoints[-1] if entrypoints else None, 'ENTRYPOINT is not ["meshplane"] in exec (JSON) form')
    for cmd in final.of("CMD"):
        if _exec_form(cmd.args) is None:
            problem(cmd, "CMD in shell form: use exec (JSON) form (DL3025)")
    exposed = {w.partition("/")[0] for ins in final.of("EXPOSE") for w in ins.args.split()}
    for port in (XDS_PORT, HTTP_PORT):
        if str(port) not in exposed:
            problem(None, f"the final stage does not EXPOSE {port}")
    if not final.of("WORKDIR"):
        problem(None, "the final stage sets no WORKDIR")
    if _env(final).get("PYTHONDONTWRITEBYTECODE") != "1":
        problem(None, "PYTHONDONTWRITEBYTECODE=1 not set: Python would write .pyc files on a read-only root")
    return problems


def image_uid() -> int:
    """The numeric USER of the Dockerfile's final stage."""
    users = stages(parse_dockerfile(DOCKERFILE.read_text()))[-1].of("USER")
    assert users, "the Dockerfile's final stage has no USER"
    user = users[-1].args.partition(":")[0]
    assert user.isdigit(), f"the Dockerfile's USER {user!r} is not a numeric UID"
    return int(user)


def test_the_dockerfile_passes_the_lint() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_the_dockerfile_labels_the_project_version() -> None:
    labels = " ".join(i.args for i in parse_dockerfile(DOCKERFILE.read_text()) if i.keyword == "LABEL")
    assert f'org.opencontainers.image.version="{project_version()}"' in labels


def _in_final(line: str) -> Callable[[str], str]:
    """Put an instruction into the final stage (before its WORKDIR)."""
    return lambda text: text.replace("WORKDIR /etc/meshplane\n", f"{line}\nWORKDIR /etc/meshplane\n")


def _replace(old: str, new: str) -> Callable[[str], str]:
    return lambda text: text.replace(old, new)


_BASE = "FROM python:3.11-slim-bookworm"
DOCKERFILE_MUTATIONS: list[tuple[str, Callable[[str], str], str]] = [
    ("one stage", lambda text: text[text.index(f"{_BASE}\n"):], "not multi-stage"),
    ("untagged base", _replace(f"{_BASE}\n", "FROM python\n"), "untagged"),
    ("latest base", _replace(f"{_BASE}\n", "FROM python:latest\n"), "latest"),
    ("variable base", _replace(f"{_BASE}\n", "FROM ${BASE}\n"), "variable"),
    ("different bases", _replace(f"{_BASE}\n", "FROM python:3.12-slim-bookworm\n"), "different bases"),
    ("no USER", _replace("USER 10001:10001\n", ""), "no USER"),
    ("USER root", _replace("USER 10001:10001", "USER root"), "root"),
    ("USER 0", _replace("USER 10001:10001", "USER 0:0"), "root"),
    ("USER by name", _replace("USER 10001:10001", "USER meshplane"), "by number"),
    ("pip install from the index", _in_final("RUN pip install --no-cache-dir meshplane"), "package index"),
    ("pip with its cache", _in_final("RUN pip install --no-index /wheels/meshplane.whl"), "cache"),
    ("apt-get, recommends", _in_final(
        "RUN apt-get update && apt-get install -y curl && rm -rf /var/lib/apt/lists/*"), "no-install-recommends"),
    ("apt-get, lists kept", _in_final("RUN apt-get update && apt-get install -y --no-install-recommends curl"),
     "lists not removed"),
    ("gcc in the final stage", _in_final("RUN apt-get update && apt-get install -y --no-install-recommends gcc "
                                         "&& rm -rf /var/lib/apt/lists/*"), "build tools"),
    ("g++ in the final stage", _in_final("RUN apt-get update && apt-get install -y --no-install-recommends g++ "
                                         "&& rm -rf /var/lib/apt/lists/*"), "final stage: g++"),
    ("ADD a URL", _in_final("ADD https://example.com/tool.tar.gz /opt/"), "URL"),
    ("ADD a file", _in_final("ADD README.md /opt/"), "use COPY"),
    ("ENTRYPOINT shell form", _replace('ENTRYPOINT ["meshplane"]', "ENTRYPOINT meshplane"), "exec (JSON) form"),
    ("CMD shell form", _replace('CMD ["serve", "--help"]', "CMD serve --help"), "DL3025"),
    ("no EXPOSE 18000", _replace("EXPOSE 18000 18001", "EXPOSE 18001"), "EXPOSE 18000"),
    ("source not copied", _replace("COPY meshplane ./meshplane\n", ""), "does not copy meshplane"),
    ("source in the final stage", _in_final("COPY . /src"), "build context"),
    ("writes bytecode", _replace("PYTHONDONTWRITEBYTECODE=1", "PYTHONHASHSEED=0"), "PYTHONDONTWRITEBYTECODE"),
    ("relative WORKDIR", _replace("WORKDIR /etc/meshplane", "WORKDIR etc/meshplane"), "relative"),
    ("a pipe without pipefail", _in_final("RUN python -V | tee /dev/null"), "pipefail"),
]


@pytest.mark.parametrize(("what", "mutate", "expected"), DOCKERFILE_MUTATIONS,
                         ids=[m[0].replace(" ", "-") for m in DOCKERFILE_MUTATIONS])
def test_each_dockerfile_rule_fails_on_a_broken_dockerfile(
        what: str, mutate: Callable[[str], str], expected: str) -> None:
    text = DOCKERFILE.read_text()
    broken = mutate(text)
    assert broken != text, f"the mutation {what!r} no longer applies to the Dockerfile"
    problems = dockerfile_problems(broken)
    assert any(expected in p for p in problems), problems


# ---- the build context ------------------------------------------------------------------------------------------

def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match, plus **) as a regex over a slash-separated path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching the path, or one of its
    parent folders, decides; `!` lets it back in."""
    parents = list(_parents(path))
    excluded = False
    for raw in patterns:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.fullmatch(p) for p in parents):
            excluded = not negate
    return excluded


def _parents(path: str) -> Iterator[str]:
    """a/b/c -> a, a/b, a/b/c"""
    parts = PurePosixPath(path).parts
    for n in range(1, len(parts) + 1):
        yield "/".join(parts[:n])


KEPT_OUT = [".venv/bin/python", ".git/HEAD", "bench/results/storm.json", "bench/scale.py", "tests/test_deploy.py",
            ".pytest_cache/v/cache", ".mypy_cache/3.11/x.json", ".ruff_cache/CACHEDIR.TAG",
            "meshplane.egg-info/PKG-INFO", "meshplane/__pycache__/cli.cpython-311.pyc",
            "meshplane/xds/__pycache__/wire.cpython-311.pyc", "docs/deploying.md", "deploy/kubernetes/meshplane.yaml",
            "docker-compose.yml", "kubeconfig.yaml", ".env"]


def test_the_build_context_is_only_what_the_wheel_is_built_from() -> None:
    patterns = DOCKERIGNORE.read_text().splitlines()
    for path in KEPT_OUT:
        assert dockerignore_excludes(patterns, path), f"{path} would be sent to the Docker daemon"
    sources = ["pyproject.toml", "README.md"] + [
        str(p.relative_to(ROOT)) for p in (ROOT / "meshplane").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts]
    for path in sources:
        assert not dockerignore_excludes(patterns, path), f"{path} is needed by the build stage but left out"
    copied = {w for i in parse_dockerfile(DOCKERFILE.read_text()) if i.keyword == "COPY" and "--from" not in i.args
              for w in i.args.split()[:-1]}
    for source in copied:
        assert not dockerignore_excludes(patterns, source), f"the Dockerfile copies {source}, .dockerignore drops it"


@pytest.mark.parametrize(("patterns", "path", "excluded"), [
    ([], ".venv/bin/python", False),
    (["*", "!meshplane"], ".venv/bin/python", True),
    (["*", "!meshplane"], "meshplane/cli.py", False),
    (["*", "!meshplane", "**/__pycache__"], "meshplane/__pycache__/cli.pyc", True),
    (["*", "!meshplane"], "meshplane.egg-info/PKG-INFO", True),
    (["bench/results"], "bench/results/a/b.json", True),
    (["bench/results"], "bench/scale.py", False),
    (["**/*.py[cod]"], "meshplane/x/y.pyc", True),
    (["/.git"], ".git/HEAD", True),
])
def test_the_dockerignore_matcher(patterns: list[str], path: str, excluded: bool) -> None:
    assert dockerignore_excludes(patterns, path) is excluded


# ---- the documentation ------------------------------------------------------------------------------------------

def test_the_docs_name_the_build_command_and_every_manifest() -> None:
    docs = (ROOT / "docs" / "deploying.md").read_text()
    assert "docker build -t meshplane:dev ." in docs
    for name in base_files():
        assert f"deploy/kubernetes/base/{name}" in docs, name
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/kubernetes/overlays/{overlay}" in docs, overlay


# ---- the image, built and run (needs a Docker engine) -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not docker_engine(), reason="no Docker engine on this machine (docker is only a client here)")
def test_the_image_builds_and_runs_read_only_as_non_root() -> None:
    tag = f"meshplane-test:{uuid.uuid4().hex[:12]}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    try:
        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["docker", "run", "--rm", "--read-only", "--cap-drop=ALL",
                                   "--security-opt=no-new-privileges", *args],
                                  capture_output=True, text=True, check=False, timeout=300)

        help_ = run(tag, "--help")
        assert help_.returncode == 0, help_.stderr
        assert "serve" in help_.stdout
        default = run(tag)  # CMD: serve --help
        assert default.returncode == 0 and "--local-cluster" in default.stdout, default.stderr
        policy = run("-v", f"{EXAMPLE_POLICY.parent}:/etc/meshplane/policy:ro", tag,
                     "validate", "/etc/meshplane/policy/policy.yaml")
        assert policy.returncode == 0, policy.stdout + policy.stderr
        uid = run("--entrypoint", "id", tag, "-u")
        assert uid.stdout.strip() == str(image_uid()), uid.stderr
        absent = run("--entrypoint", "python", tag, "-c",
                     "import os, shutil, sys; "
                     "found = [t for t in ('gcc', 'cc', 'make', 'pip', 'pip3') if shutil.which(t)]; "
                     "found += [p for p in ('/src', '/wheels', '/root/.cache/pip') if os.path.exists(p)]; "
                     "sys.exit(str(found) if found else 0)")
        assert absent.returncode == 0, f"in the final image: {absent.stderr}"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
