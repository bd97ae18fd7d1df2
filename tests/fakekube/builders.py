"""Builders for Kubernetes objects in their JSON shape (the fields the real API server returns).

The fake fills apiVersion/kind and metadata.resourceVersion/uid/creationTimestamp on put().
Ports may be given as plain numbers (named "port-N", TCP) or as dicts in Kubernetes shape.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

Obj = dict[str, Any]
Port = int | Mapping[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"


def _metadata(name: str, ns: str | None, labels: Mapping[str, str] | None,
              annotations: Mapping[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _port(port: Port, *, service: bool) -> Obj:
    if isinstance(port, int):
        out: Obj = {"name": f"port-{port}", "port": port, "protocol": "TCP"}
        if service:
            out["targetPort"] = port
        return out
    out = {"protocol": "TCP", **port}
    if service:
        out.setdefault("targetPort", out["port"])
    return out


def service(name: str, ns: str = "default", ports: Iterable[Port] = (80,), *,
            labels: Mapping[str, str] | None = None, selector: Mapping[str, str] | None = None,
            cluster_ip: str = "10.96.0.10", type: str = "ClusterIP",
            annotations: Mapping[str, str] | None = None) -> Obj:
    """A v1 Service; `ports` are ServicePorts (name, port, protocol, targetPort)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, ns, labels, annotations),
        "spec": {
            "type": type,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": dict(selector if selector is not None else {"app": name}),
            "ports": [_port(p, service=True) for p in ports],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }


def endpoint(address: str | Iterable[str], *, ready: bool = True, serving: bool | None = None,
             terminating: bool = False, node_name: str | None = None, zone: str | None = None,
             pod: str | None = None, ns: str = "default") -> Obj:
    """One EndpointSlice endpoint (a shortcut for the dicts endpoint_slice() takes)."""
    ep: Obj = {
        "addresses": [address] if isinstance(address, str) else list(address),
        "conditions": {"ready": ready, "serving": ready if serving is None else serving,
                       "terminating": terminating},
    }
    if node_name is not None:
        ep["nodeName"] = node_name
    if zone is not None:
        ep["zone"] = zone
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "namespace": ns, "name": pod}
    return ep


def endpoint_slice(name: str, ns: str, service: str, endpoints: Iterable[Mapping[str, Any]] = (),
                   ports: Iterable[Port] = (80,), *, address_type: str = "IPv4",
                   labels: Mapping[str, str] | None = None) -> Obj:
    """A discovery.k8s.io/v1 EndpointSlice of `service`, labelled as the EndpointSlice controller does.

    `endpoints` are dicts in Kubernetes shape: addresses, conditions (ready/serving/terminating,
    missing ones default to ready and serving, not terminating), nodeName, zone, targetRef, hints.
    """
    eps = []
    for given in endpoints:
        ep = {k: v for k, v in given.items() if v is not None}
        ep["addresses"] = list(ep.get("addresses") or [])
        ep["conditions"] = {"ready": True, "serving": True, "terminating": False, **(ep.get("conditions") or {})}
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _metadata(name, ns, {SERVICE_NAME_LABEL: service,
                                         MANAGED_BY_LABEL: "endpointslice-controller.k8s.io", **(labels or {})}),
        "addressType": address_type,
        "endpoints": eps,
        "ports": [_port(p, service=False) for p in ports],
    }


def node(name: str, region: str, zone: str, *, subzone: str | None = None, address: str = "10.0.0.1",
         labels: Mapping[str, str] | None = None) -> Obj:
    """A v1 Node with the well-known topology labels, Ready."""
    all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                  REGION_LABEL: region, ZONE_LABEL: zone}
    if subzone is not None:
        all_labels[SUBZONE_LABEL] = subzone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _metadata(name, None, {**all_labels, **(labels or {})}),
        "spec": {},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


def pod(name: str, ns: str = "default", labels: Mapping[str, str] | None = None, *, ip: str | None = None,
        node_name: str | None = None, phase: str = "Running", ready: bool = True) -> Obj:
    """A v1 Pod with one container."""
    spec: Obj = {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    if node_name is not None:
        spec["nodeName"] = node_name
    pod_status: Obj = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip is not None:
        pod_status["podIP"] = ip
        pod_status["podIPs"] = [{"ip": ip}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(name, ns, labels), "spec": spec,
            "status": pod_status}


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": _metadata(name, None, {"kubernetes.io/metadata.name": name, **(labels or {})}),
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def kubeconfig_secret(name: str, ns: str, cluster_id: str, kubeconfig_yaml: str | Mapping[str, Any],
                      labels: Mapping[str, str] | None = None) -> Obj:
    """An Opaque Secret holding a remote cluster's kubeconfig under the key `cluster_id`.

    The layout Istio's remote secrets use: data[cluster_id] = base64(kubeconfig YAML).
    `kubeconfig_yaml` may also be a kubeconfig dict (e.g. FakeKubeAPI.kubeconfig()).
    """
    text = kubeconfig_yaml if isinstance(kubeconfig_yaml, str) else yaml.safe_dump(dict(kubeconfig_yaml))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(name, ns, labels),
        "type": "Opaque",
        "data": {cluster_id: base64.b64encode(text.encode()).decode()},
    }
