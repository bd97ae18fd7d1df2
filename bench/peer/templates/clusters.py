"""sovereign template (python): one EDS cluster per service, like meshplane's CDS.

sovereign calls `call(**context)` for every CDS poll; `instances` is the source data (the list
in instances.yaml), `eds_refresh_delay` comes from template_context in sovereign.yaml.
"""


def cluster_name(service):
    return f"outbound|{service['port']}||{service['name']}.{service['namespace']}.svc.cluster.local"


def call(instances, eds_refresh_delay="1s", **_kwargs):
    for service in instances:
        name = cluster_name(service)
        yield {
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {
                "service_name": name,
                "eds_config": {
                    "resource_api_version": "V3",
                    "api_config_source": {
                        "api_type": "REST",
                        "transport_api_version": "V3",
                        "cluster_names": ["sovereign"],
                        "refresh_delay": eds_refresh_delay,
                        "request_timeout": "5s",
                    },
                },
            },
        }
