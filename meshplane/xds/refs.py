"""What a resource names of other resources: the references make before break orders a push by.

A route configuration names clusters (a route's cluster, its weighted
clusters, its mirrors): Envoy answers 503 (`no_cluster`) for a route whose
cluster it has not warmed yet, so such a route is sent only once the
cluster, and the cluster's endpoints, are ACKed by that client. An EDS
cluster names its assignment: Envoy warms it until the assignment arrives.
Listeners name route configurations only (over RDS), and Envoy itself
warms a listener until they arrive, so nothing of a listener is named here.

These are Envoy's references, read from the protos, not meshplane's policy:
the protocol servers order by them without knowing what a route is for
(meshplane/xds/order.py).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import message as pb_message

from meshplane.xds import typeurls

Needs = tuple[tuple[str, frozenset[str]], ...]
"""(type URL, names) a resource refers to; empty for a resource that refers to nothing."""

NONE: Needs = ()


def needs(type_url: str, msg: pb_message.Message) -> Needs:
    """The resources `msg` (of `type_url`) refers to."""
    if type_url == typeurls.ROUTE:
        clusters = _route_clusters(msg)
        return ((typeurls.CLUSTER, clusters),) if clusters else NONE
    if type_url == typeurls.CLUSTER and isinstance(msg, cluster_pb2.Cluster) and msg.type == cluster_pb2.Cluster.EDS:
        return ((typeurls.ENDPOINT, frozenset((msg.eds_cluster_config.service_name or msg.name,))),)
    return NONE


def _route_clusters(config: pb_message.Message) -> frozenset[str]:
    names: set[str] = set()
    for host in getattr(config, "virtual_hosts", ()):
        for route in host.routes:
            if not route.HasField("route"):
                continue  # a redirect or a direct response names no cluster
            action = route.route
            which = action.WhichOneof("cluster_specifier")
            if which == "cluster":
                names.add(action.cluster)
            elif which == "weighted_clusters":
                names.update(c.name for c in action.weighted_clusters.clusters)
            names.update(m.cluster for m in action.request_mirror_policies if m.cluster)
    return frozenset(names)
