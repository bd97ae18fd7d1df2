"""sovereign template (python): one ClusterLoadAssignment per service, endpoints grouped by
locality, health from the source, like meshplane's EDS (without its failover priorities).

Envoy's REST EDS asks for one cluster per request (`resource_names`); only that one is built,
so sovereign's version hash covers just the requested cluster and an unchanged cluster is
answered 304 (not modified) instead of being re-sent.
"""

HEALTH = {"healthy": "HEALTHY", "draining": "DRAINING", "unhealthy": "UNHEALTHY"}


def cluster_name(service):
    return f"outbound|{service['port']}||{service['name']}.{service['namespace']}.svc.cluster.local"


def call(instances, resource_names=(), **_kwargs):
    wanted = set(resource_names)
    for service in instances:
        name = cluster_name(service)
        if wanted and name not in wanted:
            continue
        localities = {}
        for ep in service["endpoints"]:
            key = (ep["region"], ep["zone"], ep["cluster"])
            localities.setdefault(key, []).append({
                "endpoint": {"address": {"socket_address": {"address": ep["address"],
                                                            "port_value": ep["port"]}}},
                "health_status": HEALTH[ep.get("health", "healthy")],
                "load_balancing_weight": ep.get("weight", 1),
            })
        yield {
            "cluster_name": name,
            "endpoints": [
                {"locality": {"region": region, "zone": zone, "sub_zone": cluster},
                 "lb_endpoints": lb_endpoints}
                for (region, zone, cluster), lb_endpoints in localities.items()
            ],
        }
