"""Proxy classification: a client's xDS `Node` turned into a validated `Proxy`, and its view key.

This is the only module that reads node data (docs/architecture.md, layer 1).
Everything below works with `Proxy` and `ViewKey` values. Node data that
cannot be served is refused here with `InvalidNode`, whose message names
the field and the value (the protocol servers answer INVALID_ARGUMENT with
it), instead of being guessed at: a listener port of 1.5 is not port 1.

Node metadata follows what Envoy bootstraps and Istio write: a Struct whose
numbers may also be given as text ("15001"), as Istio's node metadata is.
Fields meshplane does not know are ignored (proxies carry plenty of them).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshplane.discovery import model


class Kind(enum.StrEnum):
    """What kind of client a proxy is; each kind has its generator (meshplane/xds/generators/)."""

    SIDECAR = "sidecar"
    GATEWAY = "gateway"
    GRPC = "grpc"  # a proxyless gRPC client (grpcio's, grpc-go's, grpc-java's own xDS client)


class InvalidNode(ValueError):
    """Node data meshplane cannot serve. The message names the field, the value and why."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {_show(value)} {reason}" if value is not _ABSENT else f"{field}: {reason}")


_ABSENT = object()


@dataclass(frozen=True, order=True, slots=True)
class Listener:
    """Where a sidecar's outbound HTTP listener listens (the address applications call through)."""

    address: str = "0.0.0.0"
    port: int = 15001


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewKey:
    """What a client's resources depend on, besides the catalog and the policy.

    Clients with equal keys share one view: resources built and serialised once
    (invariant 1). `labels` holds only the client labels the policy reads.
    """

    kind: Kind
    locality: model.Locality
    namespace: str = "default"
    listener: Listener = Listener()
    labels: tuple[tuple[str, str], ...] = ()
    gateway: str = ""  # a gateway's name (policy `gateways[].name`)

    def __str__(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in self.labels)
        if self.kind == Kind.GATEWAY:
            return f"{self.kind}:{self.gateway}@{self.locality}/{self.listener.address}"
        if self.kind == Kind.GRPC:
            return f"{self.kind}@{self.locality}/{self.namespace}[{labels}]"
        return f"{self.kind}@{self.locality}/{self.namespace}:{self.listener.port}[{labels}]"


@dataclass(frozen=True, slots=True, kw_only=True)
class Proxy:
    """A connected client, as classified from its node."""

    id: str
    kind: Kind
    locality: model.Locality
    namespace: str = "default"
    labels: tuple[tuple[str, str], ...] = ()  # sorted
    listener: Listener = Listener()
    gateway: str = ""  # gateways only: which gateway of the policy this proxy is

    def view_key(self, label_keys: frozenset[str]) -> ViewKey:
        """This proxy's view key, given the client labels the policy reads (they change with the policy)."""
        return ViewKey(
            kind=self.kind,
            locality=self.locality,
            namespace=self.namespace,
            listener=self.listener,
            labels=tuple((k, v) for k, v in self.labels if k in label_keys),
            gateway=self.gateway,
        )


def classify(node: base_pb2.Node) -> Proxy:
    """The validated `Proxy` a node describes; `InvalidNode` naming the field if it cannot be served."""
    if not node.id:
        raise InvalidNode("node.id", _ABSENT, "is required (the first DiscoveryRequest of a stream carries the node)")
    meta: Mapping[str, struct_pb2.Value] = node.metadata.fields if node.HasField("metadata") else {}
    kind = _kind(meta, node.user_agent_name)
    return Proxy(
        id=node.id,
        kind=kind,
        locality=model.Locality(region=node.locality.region, zone=node.locality.zone, cluster=node.locality.sub_zone),
        namespace=_namespace(meta),
        labels=_labels(meta),
        listener=Listener(address=_address(meta), port=_port(meta)),
        gateway=_gateway(meta) if kind == Kind.GATEWAY else "",
    )


# One reader per metadata field. Each returns the default when the field is absent.

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace: a DNS-1123 label


GRPC_USER_AGENT = "gRPC "
"""How gRPC's xDS clients name themselves in `node.user_agent_name` ("gRPC C-core linux Python",
"gRPC Go", "gRPC Java"): a node without a `role` that says this is a proxyless gRPC client."""


def _kind(meta: Mapping[str, struct_pb2.Value], user_agent: str) -> Kind:
    default = Kind.GRPC if user_agent.startswith(GRPC_USER_AGENT) else Kind.SIDECAR
    text = _text(meta, "role", default=default.value)
    try:
        return Kind(text)
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise InvalidNode("node.metadata.role", text, f"is not a kind of client meshplane serves ({known})") from None


def _namespace(meta: Mapping[str, struct_pb2.Value]) -> str:
    text = _text(meta, "namespace", default="default")
    if not _NAMESPACE.fullmatch(text):
        raise InvalidNode("node.metadata.namespace", text, "is not a Kubernetes namespace name (a DNS-1123 label)")
    return text


def _gateway(meta: Mapping[str, struct_pb2.Value]) -> str:
    if "gateway" not in meta:
        raise InvalidNode("node.metadata.gateway", _ABSENT,
                          "is required with role gateway: the name of a gateway in the policy")
    text = _text(meta, "gateway", default="")
    if not _NAMESPACE.fullmatch(text):
        raise InvalidNode("node.metadata.gateway", text, "is not a gateway name (a DNS-1123 label)")
    return text


def _address(meta: Mapping[str, struct_pb2.Value]) -> str:
    text = _text(meta, "listener_address", default="0.0.0.0")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise InvalidNode("node.metadata.listener_address", text, "is not an IP address") from None
    return text


def _port(meta: Mapping[str, struct_pb2.Value]) -> int:
    field = "node.metadata.listener_port"
    value = meta.get("listener_port")
    if value is None:
        return 15001
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number) or number != int(number):
            raise InvalidNode(field, number, "is not a port number (a whole number, 1-65535)")
        port = int(number)
    elif kind == "string_value" and value.string_value.isascii() and value.string_value.isdigit():
        port = int(value.string_value)
    else:
        raise InvalidNode(field, _plain(value), "is not a port number (1-65535)")
    if not 1 <= port <= 65535:
        raise InvalidNode(field, port, "is not a port number (1-65535)")
    return port


def _labels(meta: Mapping[str, struct_pb2.Value]) -> tuple[tuple[str, str], ...]:
    value = meta.get("labels")
    if value is None or value.WhichOneof("kind") == "null_value":
        return ()
    if value.WhichOneof("kind") != "struct_value":
        raise InvalidNode("node.metadata.labels", _plain(value), "is not a map of label names to values")
    out = []
    for key, item in value.struct_value.fields.items():
        if item.WhichOneof("kind") != "string_value":
            raise InvalidNode(f"node.metadata.labels.{key}", _plain(item), "is not text (label values are strings)")
        out.append((key, item.string_value))
    return tuple(sorted(out))


def _text(meta: Mapping[str, struct_pb2.Value], name: str, *, default: str) -> str:
    value = meta.get(name)
    if value is None:
        return default
    if value.WhichOneof("kind") != "string_value":
        raise InvalidNode(f"node.metadata.{name}", _plain(value), "is not text")
    return str(value.string_value)


@dataclass(frozen=True, slots=True)
class _Described:
    """A value shown by what it is rather than what it holds (a map, a list)."""

    text: str

    def __str__(self) -> str:
        return self.text


def _plain(value: struct_pb2.Value) -> object:
    """A metadata value as the Python value it stands for (for messages)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _Described("a map")
    if kind == "list_value":
        return _Described("a list")
    return None


def _show(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)
