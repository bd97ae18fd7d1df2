"""A small ADS client speaking real gRPC: for tests, benchmarks and debugging.

It behaves like Envoy where it matters (node on the first request, one
subscription per type, ACK by echoing the nonce, NACK with error_detail),
and leaves every decision to its caller, so protocol tests can also do
what Envoy would not (stale nonces, odd subscriptions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2


def node(
    node_id: str, *, region: str = "", zone: str = "", cluster: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> base_pb2.Node:
    out = base_pb2.Node(
        id=node_id,
        cluster="meshplane-test",
        locality=base_pb2.Locality(region=region, zone=zone, sub_zone=cluster),
    )
    if metadata:
        out.metadata.update(dict(metadata))  # built in place: any depth, as a misbehaving client may send
    return out


class AdsClient:
    """State of the world: `StreamAggregatedResources`."""

    def __init__(self, target: str, node: base_pb2.Node) -> None:
        self.target = target
        self.node = node
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._sent_node = False
        self._pending_read: asyncio.Future[Any] | None = None
        self.credentials: grpc.ChannelCredentials | None = None  # TLS (and a client certificate); None: plaintext
        self.options: list[tuple[str, Any]] = []  # gRPC channel options (e.g. a larger receive limit)

    async def __aenter__(self) -> AdsClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._channel = (grpc.aio.insecure_channel(self.target, options=self.options) if self.credentials is None
                         else grpc.aio.secure_channel(self.target, self.credentials, options=self.options))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = self._open(stub)
        self._sent_node = False

    def _open(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> Any:
        return stub.StreamAggregatedResources()

    async def close(self) -> None:
        if self._pending_read is not None:
            self._pending_read.cancel()
            self._pending_read = None
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version_info: str = "",
        nonce: str = "",
        error: str | None = None,
        with_node: bool | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version_info, response_nonce=nonce
        )
        await self._send(req, error=error, with_node=with_node)

    async def _send(self, req: Any, *, error: str | None, with_node: bool | None) -> None:
        """Write a request, with the node on the stream's first (or as `with_node` says) and error_detail for a NACK."""
        if with_node if with_node is not None else not self._sent_node:
            req.node.CopyFrom(self.node)
            self._sent_node = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self._call.write(req)

    async def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        response = await self._recv(timeout)
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        return response

    async def _recv(self, timeout: float) -> Any:
        response = await asyncio.wait_for(asyncio.shield(self._read_task()), timeout)
        self._pending_read = None
        if response is grpc.aio.EOF:
            raise EOFError("ADS stream closed by the server")
        return response

    async def expect_nothing(self, within: float) -> None:
        """Assert no response arrives for `within` seconds."""
        try:
            response = await asyncio.wait_for(asyncio.shield(self._read_task()), within)
        except TimeoutError:
            return
        self._pending_read = None
        raise AssertionError(f"unexpected response: {response.type_url} nonce={response.nonce}")

    def _read_task(self) -> asyncio.Future[Any]:
        if self._pending_read is None:
            self._pending_read = asyncio.ensure_future(self._call.read())
        return self._pending_read

    async def ack(self, response: discovery_pb2.DiscoveryResponse, names: Iterable[str] | None = None) -> None:
        await self.request(
            response.type_url,
            names if names is not None else self._names_of(response),
            version_info=response.version_info,
            nonce=response.nonce,
        )

    async def nack(
        self, response: discovery_pb2.DiscoveryResponse, *, kept_version: str, message: str,
        names: Iterable[str] | None = None,
    ) -> None:
        await self.request(
            response.type_url,
            names if names is not None else self._names_of(response),
            version_info=kept_version,
            nonce=response.nonce,
            error=message,
        )

    @staticmethod
    def _names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
        return [] if response.type_url.endswith(("Cluster", "Listener")) else resource_names(response)


def resources(response: discovery_pb2.DiscoveryResponse) -> dict[str, Any]:
    """The resources of a response, decoded, by name (in the order sent)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    out: dict[str, Any] = {}
    for any_msg in response.resources:
        for cls in (cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment,
                    listener_pb2.Listener, route_pb2.RouteConfiguration):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[getattr(msg, "cluster_name", "") or getattr(msg, "name", "")] = msg
                break
    return out


def resource_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    """Names of the resources in a response (decoding each Any)."""
    return list(resources(response))


class DeltaClient(AdsClient):
    """Incremental: `DeltaAggregatedResources`. Subscribes and unsubscribes by name, reports the
    versions it holds on (re)connect, ACKs and NACKs by nonce; holds what it was sent, as Envoy does."""

    def __init__(self, target: str, node: base_pb2.Node) -> None:
        super().__init__(target, node)
        self.held: dict[str, dict[str, str]] = {}  # type URL -> name -> version

    def _open(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> Any:
        return stub.DeltaAggregatedResources()

    async def delta(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        initial_versions: Mapping[str, str] | None = None,
        nonce: str = "",
        error: str | None = None,
        with_node: bool | None = None,
    ) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
        )
        req.initial_resource_versions.update(dict(initial_versions or {}))
        await self._send(req, error=error, with_node=with_node)

    async def recv_delta(self, timeout: float = 5.0) -> discovery_pb2.DeltaDiscoveryResponse:
        """The next response; what it adds and removes is applied to `held`."""
        response = await self._recv(timeout)
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
        held = self.held.setdefault(response.type_url, {})
        for resource in response.resources:
            held[resource.name] = resource.version
        for name in response.removed_resources:
            held.pop(name, None)
        return response

    async def ack_delta(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.delta(response.type_url, nonce=response.nonce)

    async def nack_delta(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> None:
        await self.delta(response.type_url, nonce=response.nonce, error=message)
