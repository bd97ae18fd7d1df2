"""Type URLs and protocol constants: the one place that names them."""

from __future__ import annotations

from typing import Final

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make before break: a cluster exists before its endpoints, a route's clusters
# before the route, a listener's route config is named before it is sent.
PUSH_ORDER: Final = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

# State of the world: these types are always sent whole (xds_protocol).
FULL_STATE: Final = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}

WILDCARD: Final = "*"

HTTP_CONNECTION_MANAGER: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_PROTOCOL_OPTIONS: Final = (
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)
