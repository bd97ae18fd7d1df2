"""DiscoveryRequests decoded from the wire: once, with a cheap key for their names, and errors that say where.

The protocol servers receive requests as bytes (their gRPC deserialiser is
the identity) and decode them here, so that a request that cannot be
decoded ends its stream with INVALID_ARGUMENT and a message naming the
part that failed (`node.metadata` nested deeper than protobuf allows, say),
not with gRPC's UNKNOWN and a bare DecodeError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.message import DecodeError

from meshplane.xds import resources

_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL


def _partial_messages() -> dict[str, Any]:
    """Messages that read one field of a request and skip the rest, built at run time.

    Skipping a field costs no recursion, so they decode what the full message cannot,
    and tell which part of it failed; `ResourceNames` reads the names alone (below).
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="meshplane/internal/partial.proto", package="meshplane.internal", syntax="proto3"
    )
    shapes = {
        "ResourceNames": ("resource_names", discovery_pb2.DiscoveryRequest.RESOURCE_NAMES_FIELD_NUMBER, _STRING,
                          _REPEATED),
        "NodeBytes": ("node", discovery_pb2.DiscoveryRequest.NODE_FIELD_NUMBER, _BYTES, _OPTIONAL),
        "DeltaNodeBytes": ("node", discovery_pb2.DeltaDiscoveryRequest.NODE_FIELD_NUMBER, _BYTES, _OPTIONAL),
        "MetadataBytes": ("metadata", 3, _BYTES, _OPTIONAL),  # envoy.config.core.v3.Node.metadata
    }
    for message_name, (field, number, kind, label) in shapes.items():
        proto.message_type.add(name=message_name).field.add(name=field, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"meshplane.internal.{name}"))
            for name in shapes}


_PARTIAL = _partial_messages()


def _request_head() -> Any:
    """A DiscoveryRequest without its resource_names (they are skipped, not decoded): what an ACK needs.

    Every ACK repeats every name the proxy subscribes to; decoding 10,000 of them took most of an
    ACK's cost, and they are needed only when they differ from the last request's (Request.names).
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="meshplane/internal/request_head.proto", package="meshplane.internal", syntax="proto3",
        dependency=["envoy/config/core/v3/base.proto", "google/rpc/status.proto"],
    )
    head = proto.message_type.add(name="RequestHead")
    request = discovery_pb2.DiscoveryRequest.DESCRIPTOR
    for field in request.fields:
        if field.number == discovery_pb2.DiscoveryRequest.RESOURCE_NAMES_FIELD_NUMBER:
            continue
        out = head.field.add(name=field.name, number=field.number, type=field.type, label=_OPTIONAL)
        if field.message_type is not None:
            out.type_name = "." + field.message_type.full_name
    pool = descriptor_pool.Default()
    with contextlib.suppress(TypeError):  # already added (the module imported twice)
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("meshplane.internal.RequestHead"))


_HEAD = _request_head()


class BadRequest(ValueError):
    """A request that cannot be decoded; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class Request:
    """A DiscoveryRequest without its names (`message`: every field but resource_names), its
    resource_names alone, serialised (`names_key`), and the names themselves, decoded on demand.

    Every ACK repeats the names the proxy subscribes to (a thousand, for a proxy of a
    thousand services). Equal keys mean equal names, which a bytes comparison tells in
    about a microsecond; a set of the names takes some 70 us per ACK to build and compare,
    and decoding them more than the rest of the ACK.
    """

    message: Any
    names_key: bytes
    raw: bytes

    def names(self) -> Sequence[str]:
        """The resource_names; `BadRequest` if they cannot be decoded (they are checked only when read)."""
        try:
            return list(_PARTIAL["ResourceNames"].FromString(self.raw).resource_names)
        except DecodeError:
            raise BadRequest("DiscoveryRequest.resource_names cannot be decoded: malformed") from None


def decode(raw: bytes) -> Request:
    """Decode a state-of-the-world request but its names; `BadRequest` saying where, if it cannot be."""
    try:
        message = _HEAD.FromString(raw)
    except DecodeError as exc:
        raise BadRequest(_where(raw, exc)) from None
    key = _names_run(raw, message)
    if key is None:
        names = _PARTIAL["ResourceNames"].FromString(raw)
        names.DiscardUnknownFields()
        key = names.SerializeToString()
    return Request(message, key, raw)


_NAMES_TAG = discovery_pb2.DiscoveryRequest.RESOURCE_NAMES_FIELD_NUMBER << 3 | 2


def _names_run(raw: bytes, message: Any) -> bytes | None:
    """The request's resource_names as encoded, sliced out of `raw` without decoding them again: a
    proxy's ACK repeats every name it subscribes to (half a megabyte for 10,000 clusters), and
    decoding them a second time to compare costs more than the rest of the ACK. Clients encode
    fields in order (version_info, node, resource_names, type_url, response_nonce, error_detail);
    a request encoded otherwise gets None (the names are then decoded apart), as does anything
    this does not recognise. The slice may hold more than the names when fields come out of order:
    then it differs from one ACK to the next, which costs a comparison of the names, never a wrong
    answer (equal slices are equal names)."""
    pos, end = 0, len(raw)
    while pos < end:  # skip version_info and node
        tag = raw[pos]
        if tag == _NAMES_TAG:
            break
        if tag not in (0x0A, 0x12):  # field 1 or 2, length-delimited (one-byte tags)
            return None
        length, pos = _varint(raw, pos + 1)
        pos += length
    tail = b"".join((
        _field(discovery_pb2.DiscoveryRequest.TYPE_URL_FIELD_NUMBER, message.type_url.encode()),
        _field(discovery_pb2.DiscoveryRequest.RESPONSE_NONCE_FIELD_NUMBER, message.response_nonce.encode()),
        _field(discovery_pb2.DiscoveryRequest.ERROR_DETAIL_FIELD_NUMBER, message.error_detail.SerializeToString(),
               present=message.HasField("error_detail")),
    ))
    stop = end - len(tail)
    if stop < pos or raw[stop:] != tail:
        return None
    return raw[pos:stop]


def _field(number: int, value: bytes, *, present: bool = False) -> bytes:
    return resources.length_delimited(number, value) if value or present else b""


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(raw):
            raise IndexError("truncated varint")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def decode_delta(raw: bytes) -> discovery_pb2.DeltaDiscoveryRequest:
    """Decode a delta request; `BadRequest` saying where, if it cannot be."""
    try:
        return discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
    except DecodeError as exc:
        raise BadRequest(_where(raw, exc, request="DeltaDiscoveryRequest", node_part="DeltaNodeBytes")) from None


def _where(raw: bytes, exc: DecodeError, *, request: str = "DiscoveryRequest", node_part: str = "NodeBytes") -> str:
    """Which part of an undecodable request failed: node.metadata, node, or the request itself."""
    depth = "MaxDepth" in str(exc)
    why = "nested deeper than protobuf decodes (100 levels of messages)" if depth else "malformed"
    try:
        node = _PARTIAL[node_part].FromString(raw).node
        metadata = _PARTIAL["MetadataBytes"].FromString(node).metadata
    except DecodeError:
        return f"{request} cannot be decoded: {why}"
    metadata_fails = bool(metadata) and depth  # the only deep structure a proxy sends
    if metadata and not metadata_fails:
        try:
            struct_pb2.Struct.FromString(metadata)
        except DecodeError:
            metadata_fails = True
    if metadata_fails:
        hint = " (node metadata may nest at most 32 levels of maps)" if depth else ""
        return f"node.metadata cannot be decoded: {why}{hint}"
    return f"node cannot be decoded: {why}" if node else f"{request} cannot be decoded: {why}"
