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


GATEWAY_API_RETRY_ON = ("connect-failure", "refused-stream", "reset", "unavailable", "cancelled")
"""What a Gateway API `retry` (GEP-1731) retries besides its codes: "connection errors (disconnect,
reset, timeout, TCP failure)" (Envoy's connect-failure, refused-stream and reset, which covers a
timed-out try), and, as Istio maps it, gRPC's unavailable and cancelled."""


@dataclass(frozen=True, slots=True)
class Retries:
    """A route's retry policy. The default is Istio's: 2 retries on connection failures,
    refused streams, gRPC unavailable/cancelled and 503, each on another host."""

    attempts: int = 2
    per_try_timeout_ms: int | None = None
    retry_on: tuple[str, ...] = ISTIO_RETRY_ON
    status_codes: tuple[int, ...] = (503,)
    backoff_ms: int | None = None  # Envoy's retry_back_off base interval (default 25 ms)


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
class Redirect:
    """Gateway API RequestRedirect: the rule answers with a redirect; what it leaves out is the
    request's (the scheme and, as Gateway API says, the listener's port)."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    full_path: str | None = None  # ReplaceFullPath
    prefix: str | None = None  # ReplacePrefixMatch
    status_code: int = 302


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

    @property
    def standby(self) -> bool:
        """Whether the backend is an active-standby order of clusters (two or more)."""
        return len(self.clusters) > 1

    def selects(self) -> Backend:
        """This backend without its weight: what its Envoy cluster depends on."""
        return Backend(self.service, self.port, 1, self.clusters, self.labels, self.spread)


@dataclass(frozen=True, slots=True)
class Mirror:
    """Gateway API RequestMirror: a copy of `per_million` of the rule's requests goes to `backend`,
    whose answers are dropped."""

    backend: Backend
    per_million: int = 1_000_000


@dataclass(frozen=True, slots=True)
class Rule:
    matches: tuple[Match, ...] = (Match(),)
    backends: tuple[Backend, ...] = ()
    headers: HeaderModifier | None = None  # of the request
    rewrite: Rewrite | None = None
    timeout_ms: int | None = None  # the whole request; 0: none
    retries: Retries | None = None  # None: the policy's default
    name: str | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None  # the rule answers itself: backends are not used
    mirrors: tuple[Mirror, ...] = ()
    backend_timeout_ms: int | None = None  # each try (Gateway API timeouts.backendRequest); 0: none

    @property
    def standby(self) -> bool:
        """Whether the rule sends to an active-standby backend (an order of clusters)."""
        return any(b.standby for b in self.backends)


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


def without_port(host: str) -> str:
    """A Host header's host: `example.com:8080` -> `example.com`, `[::1]:8080` -> `[::1]` (Gateway API
    matches hostnames whatever the port)."""
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end != -1 else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


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
