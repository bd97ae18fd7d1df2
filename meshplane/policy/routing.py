"""Layer-7 routing as the resolved policy holds it: gateways, routes, backends, retries.

The shapes follow the Kubernetes Gateway API (`Gateway`, `HTTPRoute`), which
operators of Envoy Gateway, Istio and kgateway already write; meshplane adds
what multi-cluster failover needs to a backend: pinning it to one cluster,
an ordered list of clusters (active-standby), a label subset, and whether a
gateway prefers near endpoints. Plain frozen values: the generators read
them, `meshplane.policy.document` builds them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshplane.discovery import model

MESH = "mesh"
"""The parent kind of a route for sidecars (a Gateway API `parentRef` of kind Service)."""


class PathKind(enum.StrEnum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


class ValueKind(enum.StrEnum):
    EXACT = "Exact"
    REGEX = "RegularExpression"


class Spread(enum.StrEnum):
    """How a gateway spreads a backend's requests over its endpoints."""

    EVERYWHERE = "spread"  # every healthy endpoint in every cluster alike: weighted by endpoint count
    NEAREST = "nearest"  # nearest first from the gateway's locality, as sidecars do


ISTIO_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes")


@dataclass(frozen=True, slots=True)
class Retries:
    """A route's retry policy. The default is Istio's: 2 retries on connection failures,
    refused streams, gRPC unavailable/cancelled and 503, each on another host."""

    attempts: int = 2
    per_try_timeout_ms: int | None = None
    retry_on: tuple[str, ...] = ISTIO_RETRY_ON
    status_codes: tuple[int, ...] = (503,)


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathKind
    value: str


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match."""

    name: str
    kind: ValueKind
    value: str


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions that must all hold (a rule matches when any of its matches does)."""

    path: PathMatch = PathMatch(PathKind.PREFIX, "/")
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    add: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    prefix: str | None = None  # ReplacePrefixMatch
    full_path: str | None = None  # ReplaceFullPath


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a rule sends requests: a service port, or a part of its endpoints.

    `clusters`: one cluster pins the backend to it; several are an active-standby order
    (the first while it has a healthy endpoint, then the next). `labels`: a label subset
    (`topology.istio.io/cluster` reads the endpoint's cluster).
    """

    service: model.ServiceKey
    port: int
    weight: int = 1
    clusters: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    spread: Spread | None = None  # None: the proxy kind's default

    @property
    def subset(self) -> str:
        """The subset part of the Envoy cluster name ("" for the whole service)."""
        parts = [f"{k}={v}" for k, v in self.labels]
        if self.clusters:
            parts.append("cluster=" + ">".join(self.clusters))
        if self.spread is not None:
            parts.append(f"lb={self.spread.value}")
        return ",".join(parts)

    def selects(self) -> Backend:
        """This backend without its weight: what its Envoy cluster depends on."""
        return Backend(self.service, self.port, 1, self.clusters, self.labels, self.spread)


@dataclass(frozen=True, slots=True)
class Rule:
    matches: tuple[Match, ...] = (Match(),)
    backends: tuple[Backend, ...] = ()
    headers: HeaderModifier | None = None
    rewrite: Rewrite | None = None
    timeout_ms: int | None = None
    retries: Retries | None = None  # None: the policy's default


@dataclass(frozen=True, slots=True)
class ParentRef:
    """What a route attaches to: a gateway (optionally one of its listeners), or a service (mesh)."""

    kind: str  # "Gateway" or "Service"
    name: str
    namespace: str = "default"
    section: str | None = None  # a gateway listener's name
    port: int | None = None  # a service port


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Tls:
    """A listener's certificate and key, as read from their files when the policy was loaded."""

    certificate_file: str
    key_file: str
    certificate: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str  # HTTP or HTTPS
    hostname: str | None = None
    tls: Tls | None = None


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    listeners: tuple[Listener, ...]


def hostname_matches(pattern: str, host: str) -> bool:
    """Gateway API hostname matching: `*.example.com` matches any name below example.com."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host != pattern[2:]
    return pattern == host


def hostnames_for(listener: Listener, route: Route) -> tuple[str, ...]:
    """The hostnames a route serves on a listener: the intersection Gateway API defines."""
    if listener.hostname is None:
        return route.hostnames or ("*",)
    if not route.hostnames:
        return (listener.hostname,)
    out = []
    for host in route.hostnames:
        if hostname_matches(listener.hostname, host) or host == listener.hostname:
            out.append(host)
        elif hostname_matches(host, listener.hostname):
            out.append(listener.hostname)
    return tuple(dict.fromkeys(out))
