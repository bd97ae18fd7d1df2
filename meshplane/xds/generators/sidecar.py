"""What an Envoy sidecar receives (docs/xds.md): per HTTP-family service port a cluster and its
endpoint assignment, ranked for the sidecar's locality; an outbound HTTP listener; and a route
configuration that routes every DNS name of a service to its cluster.

Sharing, from what each builder reads: clusters are the same for every
sidecar; assignments differ by the client's locality and labels; route
configurations by namespace (short names resolve in it); listeners by the
listener's address, port and namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshplane.discovery import model
from meshplane.policy import placement, rules
from meshplane.xds import proxy, translate, typeurls
from meshplane.xds.generators import base

LISTENER_NAME = "outbound_http"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a client calls from, as endpoint ranking reads it."""

    locality: model.Locality
    labels: tuple[tuple[str, str], ...]


def _everyone(key: proxy.ViewKey) -> None:
    return None


def _clusters(service: model.Service, policy: rules.ServicePolicy, scope: None) -> base.Built:
    return {
        translate.cluster_name(service, port): translate.build_cluster(service, port, policy)
        for port in service.ports if port.protocol != model.Protocol.TCP
    }


def _origin(key: proxy.ViewKey) -> Origin:
    return Origin(key.locality, key.labels)


def _locality_settings(policy: rules.ServicePolicy) -> rules.LocalitySettings:
    return policy.locality


def _assignments(service: model.Service, policy: rules.ServicePolicy, origin: Origin) -> base.Built:
    placements = placement.place(
        service.endpoints, client=origin.locality, client_labels=dict(origin.labels), settings=policy.locality
    )
    out = {}
    for port in service.ports:
        if port.protocol != model.Protocol.TCP:
            name = translate.cluster_name(service, port)
            out[name] = translate.build_load_assignment(name, port.name, placements)
    return out


def _listener_scope(key: proxy.ViewKey) -> tuple[proxy.Listener, str]:
    return key.listener, key.namespace


def _no_service(service: model.Service | None) -> None:
    return None


def _no_policy(policy: rules.Policy) -> None:
    return None


def _listener(
    services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, scope: tuple[proxy.Listener, str]
) -> base.Built:
    listener, namespace = scope
    return {LISTENER_NAME: translate.build_listener(
        name=LISTENER_NAME, address=listener.address, port=listener.port,
        route_name=translate.route_config_name(namespace),
    )}


def _namespace(key: proxy.ViewKey) -> str:
    return key.namespace


def _shape(service: model.Service | None) -> object:
    """What route configurations read of a service: its identity and ports, not its endpoints."""
    return None if service is None else (service.name, service.namespace, service.ports)


def _routes(services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, namespace: str) -> base.Built:
    return {translate.route_config_name(namespace): translate.build_route_config(namespace, services.values())}


CLUSTERS = base.PerService(scope=_everyone, reads_policy=lambda policy: policy, build=_clusters)
ASSIGNMENTS = base.PerService(scope=_origin, reads_policy=_locality_settings, build=_assignments)
LISTENERS = base.PerView(scope=_listener_scope, reads_service=_no_service, reads_policy=_no_policy, build=_listener)
ROUTES = base.PerView(scope=_namespace, reads_service=_shape, reads_policy=_no_policy, build=_routes)

GENERATOR = base.Generator(
    kind=proxy.Kind.SIDECAR,
    types={typeurls.CLUSTER: CLUSTERS, typeurls.ENDPOINT: ASSIGNMENTS,
           typeurls.LISTENER: LISTENERS, typeurls.ROUTE: ROUTES},
)
