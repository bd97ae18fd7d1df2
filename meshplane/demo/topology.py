"""The S1 mesh as data: clusters, zones, the mocka -> mockb -> mockc chain, ports.

Both `meshplane demo` and the end-to-end tests lay out their mesh from a
Topology, so the demo a newcomer watches is the mesh the tests prove.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshplane.demo.ports import free_port

CHAIN = ("mocka", "mockb", "mockc")
SERVICE_PORT = 8000


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    region: str
    zones: tuple[str, ...]


S1_CLUSTERS = (
    ClusterSpec("cluster-1", "cn-hangzhou", ("cn-hangzhou-h", "cn-hangzhou-k")),
    ClusterSpec("cluster-2", "ap-northeast-1", ("ap-northeast-1a", "ap-northeast-1b")),
)

S1_POLICY = """\
apiVersion: meshplane.io/v1
# Scenario S1: nearest-first failover. What operators wrote as an Istio
# DestinationRule, for every service of the mesh.
defaults:
  connectTimeout: 1s
  outlierDetection:
    consecutive5xxErrors: 1
    consecutiveLocalOriginFailures: 1
    splitExternalLocalOriginErrors: true
    interval: 30s
    baseEjectionTime: {base_ejection}
    maxEjectionPercent: 100
"""


@dataclass(frozen=True)
class Replica:
    service: str
    cluster: ClusterSpec
    zone: str
    port: int


@dataclass(frozen=True)
class Sidecar:
    cluster: ClusterSpec
    zone: str
    listener_port: int

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.zone}"


@dataclass
class Topology:
    clusters: tuple[ClusterSpec, ...] = S1_CLUSTERS
    chain: tuple[str, ...] = CHAIN
    replicas: list[Replica] = field(default_factory=list)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)

    @classmethod
    def build(cls, clusters: Sequence[ClusterSpec] = S1_CLUSTERS, chain: Sequence[str] = CHAIN) -> Topology:
        topo = cls(clusters=tuple(clusters), chain=tuple(chain))
        for spec in topo.clusters:
            for zone in spec.zones:
                topo.sidecars[zone] = Sidecar(spec, zone, free_port())
                for service in topo.chain:
                    topo.replicas.append(Replica(service, spec, zone, free_port()))
        return topo

    def next_service(self, service: str) -> str | None:
        i = self.chain.index(service)
        return self.chain[i + 1] if i + 1 < len(self.chain) else None

    def replica(self, service: str, zone: str) -> Replica:
        return next(r for r in self.replicas if r.service == service and r.zone == zone)

    def zones(self, region: str | None = None) -> list[str]:
        return [z for c in self.clusters for z in c.zones if region is None or c.region == region]

    def endpoint_doc(self, spec: ClusterSpec, *, health: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
        """The endpoint file of one cluster; `health` overrides (service, zone) -> health."""
        health = health or {}
        return {
            "cluster": spec.name,
            "region": spec.region,
            "services": [
                {
                    "name": service,
                    "namespace": "default",
                    "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "HTTP"}],
                    "endpoints": [
                        {"address": "127.0.0.1", "port": r.port, "zone": r.zone,
                         "health": health.get((service, r.zone), "healthy")}
                        for r in self.replicas if r.service == service and r.cluster == spec
                    ],
                }
                for service in self.chain
            ],
        }

    def write_endpoint_files(self, directory: Path, **kwargs: Any) -> list[Path]:
        paths = []
        for spec in self.clusters:
            path = directory / f"{spec.name}.yaml"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(self.endpoint_doc(spec, **kwargs), sort_keys=False))
            tmp.replace(path)
            paths.append(path)
        return paths


def s1_policy(*, base_ejection: str = "5m", extra: str = "") -> str:
    return S1_POLICY.format(base_ejection=base_ejection) + extra


GATEWAY = "edge"
GATEWAY_HOST = "example.com"

GATEWAY_ROUTES = """# Scenario S3: one gateway, `edge`, in front of both clusters.
gateways:
  - name: edge
    listeners:
      - name: http
        port: {port}
        hostname: example.com
routes:
  - name: mocka
    parentRefs: [{{name: edge}}]
    hostnames: [example.com]
    rules:
      # Active-active: every healthy mocka, in both clusters alike.
      - matches: [{{path: {{value: /mocka}}}}]
        backendRefs: [{{name: mocka, port: 8000}}]
      # Header canary: only cluster-2's mocka.
      - matches: [{{path: {{value: /mocka}}, headers: [{{name: canary, value: cluster-2}}]}}]
        backendRefs: [{{name: mocka, port: 8000, clusters: [cluster-2]}}]
      # Active-standby: cluster-1 while it has a healthy mocka, then cluster-2.
      - matches: [{{path: {{value: /standby}}}}]
        backendRefs: [{{name: mocka, port: 8000, clusters: [cluster-1, cluster-2]}}]
"""


def demo_policy(*, gateway_port: int, base_ejection: str = "15s") -> str:
    """The demo's policy: S1's outlier detection for every service, and a gateway (policy v2)."""
    v1 = s1_policy(base_ejection=base_ejection)
    return v1.replace("apiVersion: meshplane.io/v1", "apiVersion: meshplane.io/v2", 1) + \
        GATEWAY_ROUTES.format(port=gateway_port)

