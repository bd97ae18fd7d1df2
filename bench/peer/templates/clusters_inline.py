"""sovereign template (python), "inline" mode: every service as a STATIC cluster whose endpoints
(load_assignment) travel inside CDS, so each Envoy polls one resource (CDS) instead of one CDS
plus one EDS subscription per cluster. Same endpoints, localities and health as endpoints.py;
an endpoint change re-sends CDS and Envoy replaces (re-warms) only the cluster that changed.
"""

HEALTH = {"healthy": "HEALTHY", "draining": "DRAINING", "unhealthy": "UNHEALTHY"}


def cluster_name(service):
    return f"outbound|{service['port']}||{service['name']}.{service['namespace']}.svc.cluster.local"


def call(instances, **_kwargs):
    for service in instances:
        name = cluster_name(service)
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
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"locality": {"region": region, "zone": zone, "sub_zone": cluster},
                     "lb_endpoints": lb_endpoints}
                    for (region, zone, cluster), lb_endpoints in localities.items()
                ],
            },
        }
