"""Who a client is, from its TLS certificate, and whether it may be the proxy its node claims
(docs/security.md).

A client certificate carries a SPIFFE id, `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT`, as
Istio's workload certificates do. A proxy may claim (in its node) only its own namespace, and a
gateway only the gateway its service account is named after: a sidecar in `shop` cannot ask for
what `payments` proxies get, nor a sidecar act as the gateway `edge`. Checked once, on a stream's
first request, by the protocol servers (docs/architecture.md, layer 1: this module knows a
`Proxy` and the peer's properties as gRPC reports them, nothing of gRPC itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshplane.xds import proxy

SPIFFE = "spiffe://"


@dataclass(frozen=True, slots=True)
class Identity:
    trust_domain: str
    namespace: str
    account: str

    def __str__(self) -> str:
        return f"{SPIFFE}{self.trust_domain}/ns/{self.namespace}/sa/{self.account}"


@dataclass(frozen=True, slots=True)
class Peer:
    """A stream's client as its connection says: for the limits per address, the log and the identity check."""

    address: str  # gRPC's peer string (`ipv4:10.0.0.1:5000`)
    spiffe_id: str | None  # as `peer` gives it
    certificate_asked: bool = False  # its port asks for a client certificate and lets a client without one in


class Denied(Exception):
    """The client may not be the proxy it claims to be; the message says who claimed what."""


def peer(auth: Mapping[str, Sequence[bytes]]) -> str | None:
    """The SPIFFE id of a TLS peer (gRPC's `peer_spiffe_id`), "" for a TLS peer without one, None
    for a peer that is not authenticated by a certificate (plaintext, or TLS without a client cert)."""
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_pem_cert"):
        return None
    ids = auth.get("peer_spiffe_id") or [u for u in auth.get("x509_subject_alternative_name", ())
                                         if u.startswith(SPIFFE.encode())]
    return ids[0].decode(errors="replace") if ids else ""


def from_grpc(grpc_peer: str, auth: Mapping[str, Sequence[bytes]]) -> Peer:
    """A client as gRPC's own TLS (or plaintext) reports it."""
    return Peer(grpc_peer, peer(auth))


def parse(spiffe_id: str) -> Identity | None:
    """`spiffe://TD/ns/NS/sa/SA` (Istio's form), or None."""
    if not spiffe_id.startswith(SPIFFE):
        return None
    trust_domain, _, path = spiffe_id[len(SPIFFE):].partition("/")
    parts = path.split("/")
    if not trust_domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa" or not parts[1] or not parts[3]:
        return None
    return Identity(trust_domain, parts[1], parts[3])


def check(claimed: proxy.Proxy, spiffe_id: str | None, *, trust_domain: str, certificate_asked: bool = False) -> None:
    """Raise `Denied` unless a client with this certificate may be `claimed`.

    A client without a certificate (`None`) is unauthenticated: on a plaintext port it may be anything;
    where a certificate is asked for but optional (`certificate_asked`), anything but a gateway, which is
    sent its listeners' private keys (decision 0020)."""
    if spiffe_id is None:
        if certificate_asked and claimed.kind == proxy.Kind.GATEWAY:
            raise Denied(f"node {claimed.id!r} claimed to be the gateway {claimed.gateway!r} without a client "
                         "certificate: a gateway is sent its listeners' private keys, so it must present one "
                         f"(spiffe://{trust_domain}/ns/{claimed.namespace}/sa/{claimed.gateway})")
        return
    who = parse(spiffe_id)
    if who is None:
        shown = spiffe_id or "no SPIFFE id"
        raise Denied(f"client certificate carries {shown}, not spiffe://{trust_domain}/ns/NAMESPACE/sa/ACCOUNT")
    if who.trust_domain != trust_domain:
        raise Denied(f"{who} is not of the trust domain {trust_domain}")
    if who.namespace != claimed.namespace:
        raise Denied(f"{who} claimed node {claimed.id!r} in namespace {claimed.namespace!r}: "
                     f"a proxy may only claim its own namespace ({who.namespace!r})")
    if claimed.kind == proxy.Kind.GATEWAY and who.account != claimed.gateway:
        raise Denied(f"{who} claimed to be the gateway {claimed.gateway!r}: only the service account "
                     f"{claimed.gateway!r} of namespace {who.namespace!r} may")
