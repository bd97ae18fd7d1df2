"""Endpoint files: a port's protocol, from `protocol` or from Kubernetes' `appProtocol`."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshplane.discovery import filesource, model


def _ports(*ports: dict[str, Any]) -> str:
    return yaml.safe_dump({"cluster": "c1", "region": "r1", "services": [{"name": "web", "ports": list(ports)}]})


def _protocols(*ports: dict[str, Any]) -> list[model.Protocol]:
    _, services = filesource.parse(_ports(*ports), path="c1.yaml")
    return [p.protocol for p in services[model.service_key("default", "web")].ports]


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"name": "web", "port": 80}, model.Protocol.HTTP),  # neither: HTTP, the file source's default
        ({"name": "dns-tcp", "port": 53}, model.Protocol.HTTP),  # a name says nothing here: give a protocol
        ({"name": "db", "port": 5432, "protocol": "tcp"}, model.Protocol.TCP),
        ({"name": "web", "port": 80, "appProtocol": "http"}, model.Protocol.HTTP),
        ({"name": "web", "port": 80, "appProtocol": "kubernetes.io/ws"}, model.Protocol.HTTP),
        ({"name": "web", "port": 80, "appProtocol": "kubernetes.io/h2c"}, model.Protocol.HTTP2),
        ({"name": "web", "port": 80, "appProtocol": "http2"}, model.Protocol.HTTP2),
        ({"name": "web", "port": 80, "appProtocol": "GRPC"}, model.Protocol.GRPC),
        ({"name": "web", "port": 443, "appProtocol": "https"}, model.Protocol.TCP),
        ({"name": "web", "port": 80, "appProtocol": "example.com/custom"}, model.Protocol.TCP),
        ({"name": "web", "port": 80, "appProtocol": "grpc", "protocol": "GRPC"}, model.Protocol.GRPC),  # alike
        ({"name": "web", "port": 80, "appProtocol": "example.com/x", "protocol": "TCP"}, model.Protocol.TCP),
    ],
)
def test_protocol_or_app_protocol(port: dict[str, Any], protocol: model.Protocol) -> None:
    assert _protocols(port) == [protocol]


def test_app_protocol_means_what_it_means_on_a_kubernetes_service() -> None:
    """One mapping for both sources: the same appProtocol values give the same protocols."""
    from meshplane.discovery import kubemodel

    values = ["http", "kubernetes.io/ws", "http2", "kubernetes.io/h2c", "grpc", "tcp", "tls", "https",
              "kubernetes.io/wss", "mongo", "example.com/custom"]
    from_file = _protocols(*({"name": f"p{i}", "port": 1000 + i, "appProtocol": v} for i, v in enumerate(values)))
    from_kube = [kubemodel.protocol({"name": "http", "port": 80, "appProtocol": v}) for v in values]
    assert from_file == from_kube


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ({"name": "web", "port": 80, "protocol": "TCP", "appProtocol": "http"},
         "c1.yaml: services[0].ports[0].appProtocol: 'http' is HTTP, but protocol says TCP (protocol here is what "
         "Envoy speaks to the port, not Kubernetes' TCP or UDP: give one of the two, or both alike)"),
        ({"name": "web", "port": 80, "protocol": "HTTP", "appProtocol": "grpc"},
         "c1.yaml: services[0].ports[0].appProtocol: 'grpc' is GRPC, but protocol says HTTP"),
        ({"name": "web", "port": 80, "appProtocol": ["http"]},
         "c1.yaml: services[0].ports[0].appProtocol: must be a string"),
        ({"name": "web", "port": 80, "protocol": "UDP"},
         "c1.yaml: services[0].ports[0]: protocol: 'UDP' is not one of HTTP, HTTP2, GRPC, TCP"),
    ],
)
def test_a_protocol_and_an_app_protocol_that_disagree_are_an_error(port: dict[str, Any], message: str) -> None:
    with pytest.raises(filesource.EndpointFileError) as error:
        filesource.parse(_ports(port), path="c1.yaml")
    assert str(error.value).startswith(message)
