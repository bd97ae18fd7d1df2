"""The catalog's vocabulary: services, endpoints and where they live.

Every value here is frozen and hashable, so snapshots can be shared between
threads of thought (views, streams) without copies, and compared cheaply to
find out what really changed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NewType

ClusterId = NewType("ClusterId", str)
"""The id of a Kubernetes cluster (or a file source standing in for one)."""

ServiceKey = NewType("ServiceKey", str)
"""`namespace/name` of a service: unique across the mesh."""

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A Kubernetes Service name or namespace (a DNS-1123 label, with NAME_RULE's length): what the policy and
the endpoint files accept, so that a name one can hold the other can name."""
NAME_RULE = "at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"


def service_key(namespace: str, name: str) -> ServiceKey:
    return ServiceKey(f"{namespace}/{name}")


@dataclass(frozen=True, order=True, slots=True)
class Locality:
    """Where an endpoint (or a proxy) runs: region / zone / cluster.

    `cluster` is the Kubernetes cluster; Envoy carries it in `sub_zone`.
    Empty strings mean unknown.
    """

    region: str = ""
    zone: str = ""
    cluster: str = ""

    def __str__(self) -> str:
        return f"{self.region}/{self.zone}/{self.cluster}"

    @property
    def known(self) -> bool:
        return bool(self.region)


class Health(enum.Enum):
    """Endpoint health as Kubernetes conditions express it, mapped for Envoy."""

    HEALTHY = "healthy"  # ready
    DRAINING = "draining"  # serving but terminating
    UNHEALTHY = "unhealthy"  # not ready


class Protocol(enum.Enum):
    """What Envoy speaks to a service port. TCP ports are not served (no cluster, no route)."""

    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    TCP = "TCP"


_APP_PROTOCOLS = {
    "http": Protocol.HTTP,
    "kubernetes.io/ws": Protocol.HTTP,  # WebSocket over cleartext: an HTTP/1.1 upgrade
    "http2": Protocol.HTTP2,
    "kubernetes.io/h2c": Protocol.HTTP2,  # HTTP/2 over cleartext, prior knowledge
    "grpc": Protocol.GRPC,
    "grpc-web": Protocol.HTTP,  # gRPC-Web: HTTP/1.1 (or 2) from browsers, not gRPC (Istio's GRPCWeb)
}


def app_protocol(value: str) -> Protocol:
    """The protocol of a port whose Kubernetes `appProtocol` is `value` (case-insensitive).

    http, kubernetes.io/ws, grpc-web -> HTTP; http2, kubernetes.io/h2c -> HTTP2; grpc -> GRPC; anything else
    (tcp, tls, https, kubernetes.io/wss, mycompany.com/x) -> TCP: a protocol meshplane does not speak, so the
    port is not served. Both sources read `appProtocol` through this one function.
    """
    return _APP_PROTOCOLS.get(value.lower(), Protocol.TCP)


@dataclass(frozen=True, order=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: Protocol = Protocol.HTTP


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """One backend address of a service, in one cluster.

    `ports` maps a service port name to the port this endpoint listens on
    (a Kubernetes targetPort); `labels` are the pod's labels, sorted pairs.
    """

    address: str
    ports: tuple[tuple[str, int], ...]
    locality: Locality
    labels: tuple[tuple[str, str], ...] = ()
    health: Health = Health.HEALTHY
    weight: int = 1

    def port_for(self, port_name: str) -> int | None:
        for name, number in self.ports:
            if name == port_name:
                return number
        return None

    @property
    def label_map(self) -> Mapping[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class ServiceInCluster:
    """What one cluster knows of a service: its ports and its endpoints there."""

    name: str
    namespace: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> ServiceKey:
        return service_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Service:
    """A service merged over every cluster it is deployed in."""

    name: str
    namespace: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    clusters: tuple[ClusterId, ...] = field(default=())

    @property
    def key(self) -> ServiceKey:
        return service_key(self.namespace, self.name)

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"
