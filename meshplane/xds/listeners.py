"""Listeners: the sidecar's outbound HTTP listener, a gateway's HTTP and HTTPS listeners, and a
proxyless gRPC client's API listeners. Pure functions.

A gateway gets one Envoy listener per port. An HTTPS port has one filter
chain per listener (per hostname, chosen by SNI), each terminating TLS with
that listener's certificate and key. They are sent inline, read from their
files when the policy is loaded (the policy watcher re-reads them when they
change): a new certificate replaces that filter chain in place, and Envoy
keeps the listener (and the other chains' connections).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2, wrappers_pb2

from meshplane.policy import routing
from meshplane.xds import routeconfig


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)


def _packed(message: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def _http_manager(stat_prefix: str, route_name: str, *, edge: bool = False) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router()))],
    )
    if edge:  # a gateway faces clients: the peer is the client (for x-forwarded-for)
        manager.use_remote_address.CopyFrom(wrappers_pb2.BoolValue(value=True))
    return listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                          typed_config=_packed(manager))


def _address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def build_listener(*, name: str, address: str, port: int, route_name: str) -> listener_pb2.Listener:
    """The sidecar's outbound HTTP listener: applications call services by name through it."""
    return listener_pb2.Listener(
        name=name,
        address=_address(address, port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[_http_manager(name, route_name)])],
    )


def build_api_listener(*, name: str, route_name: str) -> listener_pb2.Listener:
    """A proxyless gRPC client's listener: no address, an HttpConnectionManager as its API listener,
    taking `route_name` over ADS and ending in the router filter (gRFC A27)."""
    manager = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router()))],
    )
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(
        api_listener=_packed(manager)))


def gateway_listener_name(gateway: str, port: int) -> str:
    return f"gateway|{gateway}|{port}"


def build_gateway_listener(
    gateway: routing.Gateway, port: int, listeners: Sequence[routing.Listener], *, address: str
) -> listener_pb2.Listener:
    """One gateway port: HTTP, or HTTPS with a TLS filter chain per listener (SNI = its hostname)."""
    name = gateway_listener_name(gateway.name, port)
    route_name = routeconfig.gateway_route_config_name(gateway.name, port)
    out = listener_pb2.Listener(name=name, address=_address(address, port))
    if all(ln.protocol == "HTTP" for ln in listeners):
        out.filter_chains.append(listener_components_pb2.FilterChain(
            filters=[_http_manager(name, route_name, edge=True)]))
        return out
    out.listener_filters.append(listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.tls_inspector", typed_config=_packed(tls_inspector_pb2.TlsInspector())))
    # Exact server names before wildcards before the catch-all, for Envoy's (and the reader's) sake.
    for ln in sorted((ln for ln in listeners if ln.tls is not None), key=lambda ln: _sni_order(ln.hostname)):
        assert ln.tls is not None
        context = tls_pb2.DownstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificates=[common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=ln.tls.certificate),
                private_key=base_pb2.DataSource(inline_bytes=ln.tls.key),
            )],
            alpn_protocols=["h2", "http/1.1"],
        ))
        chain = listener_components_pb2.FilterChain(
            name=f"{name}|{ln.name}",
            filters=[_http_manager(name, route_name, edge=True)],
            transport_socket=base_pb2.TransportSocket(
                name="envoy.transport_sockets.tls", typed_config=_packed(context)),
        )
        if ln.hostname is not None:
            chain.filter_chain_match.server_names.append(ln.hostname)
        out.filter_chains.append(chain)
    return out


def _sni_order(hostname: str | None) -> tuple[int, str]:
    if hostname is None:
        return (2, "")
    return (1 if hostname.startswith("*.") else 0, hostname)
