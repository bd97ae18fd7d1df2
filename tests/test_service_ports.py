"""A service with several ports, as a proxy receives it over ADS: one cluster and one load assignment
per HTTP-family port, routes by name and port; TCP ports get nothing in v1 (docs/xds.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import write_yaml

HOST = "multi.default.svc.cluster.local"
HTTP, GRPC, TCP = f"outbound|8000||{HOST}", f"outbound|9000||{HOST}", f"outbound|5432||{HOST}"
OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _doc() -> dict[str, Any]:
    return {
        "cluster": "c1",
        "region": "r1",
        "services": [{
            "name": "multi",
            "ports": [
                {"name": "http", "port": 8000, "protocol": "HTTP"},
                {"name": "grpc", "port": 9000, "protocol": "GRPC"},
                {"name": "db", "port": 5432, "protocol": "TCP"},
            ],
            "endpoints": [
                {"address": "127.0.0.1", "zone": "z1", "ports": {"http": 18080, "grpc": 19090, "db": 15432}},
                {"address": "127.0.0.2", "zone": "z2", "ports": {"http": 28080, "grpc": 29090, "db": 25432}},
            ],
        }],
    }


def _unpack(response: Any, cls: Any) -> dict[str, Any]:
    out = {}
    for res in response.resources:
        msg = cls()
        res.Unpack(msg)
        out[getattr(msg, "cluster_name", "") or msg.name] = msg
    return out


async def test_one_cluster_and_assignment_per_http_port_none_for_tcp(start_plane: Any, tmp_path: Path) -> None:
    plane = await start_plane(endpoint_files=(write_yaml(tmp_path / "c1.yaml", _doc()),))
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        await c.request(typeurls.CLUSTER)
        cds = await c.recv()
        clusters = _unpack(cds, cluster_pb2.Cluster)
        assert sorted(clusters) == [HTTP, GRPC]
        for name, cluster in clusters.items():
            assert cluster.type == cluster_pb2.Cluster.EDS, name
            assert cluster.eds_cluster_config.eds_config.HasField("ads"), name
        # gRPC upstreams need HTTP/2; a plain HTTP port keeps Envoy's HTTP/1.1 default.
        assert OPTIONS not in clusters[HTTP].typed_extension_protocol_options
        options = http_protocol_options_pb2.HttpProtocolOptions()
        clusters[GRPC].typed_extension_protocol_options[OPTIONS].Unpack(options)
        assert options.explicit_http_config.HasField("http2_protocol_options")
        await c.ack(cds)

        await c.request(typeurls.ENDPOINT, [HTTP, GRPC, TCP])
        eds = await c.recv()
        assignments = _unpack(eds, endpoint_pb2.ClusterLoadAssignment)
        assert sorted(assignments) == [HTTP, GRPC]  # nothing for the TCP port

        def targets(name: str) -> list[tuple[int, str, int]]:
            return sorted(
                (group.priority, lb.endpoint.address.socket_address.address,
                 lb.endpoint.address.socket_address.port_value)
                for group in assignments[name].endpoints for lb in group.lb_endpoints
            )

        # Each port's assignment carries the endpoints' own port for it (the targetPort).
        assert targets(HTTP) == [(0, "127.0.0.1", 18080), (1, "127.0.0.2", 28080)]
        assert targets(GRPC) == [(0, "127.0.0.1", 19090), (1, "127.0.0.2", 29090)]
        await c.ack(eds, names=[HTTP, GRPC, TCP])

        await c.request(typeurls.ROUTE, ["outbound|http|default"])
        [route] = _unpack(await c.recv(), route_pb2.RouteConfiguration).values()
        hosts = {vh.name: (list(vh.domains), vh.routes[0].route.cluster) for vh in route.virtual_hosts}
        assert hosts == {
            f"{HOST}:8000": ([
                "multi", "multi.default", "multi.default.svc", HOST,  # no port: the first port
                "multi:8000", "multi.default:8000", "multi.default.svc:8000", f"{HOST}:8000",
            ], HTTP),
            f"{HOST}:9000": ([
                "multi:9000", "multi.default:9000", "multi.default.svc:9000", f"{HOST}:9000",
            ], GRPC),
        }
