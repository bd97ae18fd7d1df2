"""The pure translation of Kubernetes objects into catalog values, table by table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import structlog

from meshplane.discovery import kubemodel, model

C1 = model.ClusterId("c1")


def svc(name: str = "web", ns: str = "shop", ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    ports = ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}]
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"ports": ports, **spec}}


def ep(address: str | None = "10.0.0.1", *, node: str | None = "n1", zone: str | None = None,
       pod: str | None = None, **conditions: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [address] if address else [], "conditions": conditions}
    if node:
        out["nodeName"] = node
    if zone:
        out["zone"] = zone
    if pod:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "shop"}
    return out


def eps(name: str = "web-abc", service: str | None = "web", endpoints: list[dict[str, Any]] | None = None,
        ports: list[dict[str, Any]] | None = None, address_type: str = "IPv4") -> dict[str, Any]:
    labels = {kubemodel.SERVICE_NAME_LABEL: service} if service else {}
    return {
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "addressType": address_type,
        "endpoints": endpoints if endpoints is not None else [ep()],
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str = "n1", region: str | None = "eu", zone: str | None = "eu-a") -> dict[str, Any]:
    labels = {}
    if region:
        labels[kubemodel.REGION_LABEL] = region
    if zone:
        labels[kubemodel.ZONE_LABEL] = zone
    return {"metadata": {"name": name, "labels": labels}}


def translate(service: dict[str, Any], *slices: dict[str, Any], nodes: Sequence[dict[str, Any]] = (),
              pods: dict[str, dict[str, str]] | None = None, default_region: str = "",
              problems: kubemodel.Problems | None = None) -> model.ServiceInCluster:
    problems = problems or kubemodel.Problems(cluster="c1")
    record = kubemodel.service_record(service, problems)
    assert record is not None
    node_map = {n.name: n for n in (kubemodel.node_record(x, problems) for x in nodes)}
    pod_map = {f"shop/{k}": kubemodel.PodRecord(tuple(sorted(v.items()))) for k, v in (pods or {}).items()}
    records = [r for r in (kubemodel.slice_record(s, problems) for s in slices) if r is not None]
    return kubemodel.service_in_cluster(
        record, records, cluster=C1, default_region=default_region, nodes=node_map.get,
        pods=pod_map.get if pods is not None else None, problems=problems,
    )


@pytest.mark.parametrize(
    ("conditions", "health"),
    [
        ({}, model.Health.HEALTHY),  # ready unset: ready, as the API documents
        ({"ready": True}, model.Health.HEALTHY),
        ({"ready": True, "serving": True, "terminating": False}, model.Health.HEALTHY),
        ({"ready": False, "serving": True, "terminating": True}, model.Health.DRAINING),
        ({"ready": False, "serving": False, "terminating": True}, model.Health.UNHEALTHY),
        ({"ready": False, "serving": True, "terminating": False}, model.Health.UNHEALTHY),
        ({"ready": False}, model.Health.UNHEALTHY),
        ({"ready": False, "terminating": True}, model.Health.UNHEALTHY),  # serving unset defers to ready
    ],
)
def test_health_from_conditions(conditions: dict[str, bool], health: model.Health) -> None:
    assert kubemodel.health(conditions) is health
    out = translate(svc(), eps(endpoints=[ep(**conditions)]), nodes=[node()])
    assert [e.health for e in out.endpoints] == [health]


@pytest.mark.parametrize(
    ("nodes", "slice_zone", "default_region", "locality"),
    [
        ([node("n1", "eu", "eu-a")], "ignored", "", model.Locality("eu", "eu-a", "c1")),
        ([], "eu-b", "eu", model.Locality("eu", "eu-b", "c1")),  # node unknown: slice zone, default region
        ([], None, "", model.Locality("", "", "c1")),
        ([node("n1", None, None)], "eu-c", "dflt", model.Locality("dflt", "eu-c", "c1")),  # node without labels
        ([node("n1", "eu", None)], "eu-c", "dflt", model.Locality("eu", "eu-c", "c1")),  # label by label
        ([node("n1", None, "eu-a")], "eu-c", "dflt", model.Locality("dflt", "eu-a", "c1")),
    ],
)
def test_locality(nodes: list[dict[str, Any]], slice_zone: str | None, default_region: str,
                  locality: model.Locality) -> None:
    out = translate(svc(), eps(endpoints=[ep(zone=slice_zone)]), nodes=nodes, default_region=default_region)
    assert [e.locality for e in out.endpoints] == [locality]


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"name": "http", "port": 80}, model.Protocol.HTTP),
        ({"name": "http-web", "port": 80}, model.Protocol.HTTP),
        ({"name": "web", "port": 80}, model.Protocol.TCP),  # no convention: not known to be HTTP, not served
        ({"name": "", "port": 80}, model.Protocol.TCP),
        ({"name": "dns-tcp", "port": 53}, model.Protocol.TCP),  # kube-dns
        ({"name": "metrics", "port": 9153}, model.Protocol.TCP),  # kube-dns: HTTP, but nothing says so
        ({"name": "httpd", "port": 80}, model.Protocol.TCP),  # a prefix is the part before the first dash
        ({"name": "http2-api", "port": 80}, model.Protocol.HTTP2),
        ({"name": "grpc", "port": 80}, model.Protocol.GRPC),
        ({"name": "grpc-orders", "port": 80}, model.Protocol.GRPC),  # the part before the first dash
        ({"name": "grpc-web", "port": 80}, model.Protocol.HTTP),  # gRPC-Web is HTTP (as Istio)
        ({"name": "grpc-web-ui", "port": 80}, model.Protocol.HTTP),
        ({"name": "grpc-webhook", "port": 80}, model.Protocol.GRPC),  # not grpc-web: its prefix is grpc
        ({"name": "x", "port": 80, "appProtocol": "grpc-web"}, model.Protocol.HTTP),
        ({"name": "tcp-db", "port": 80}, model.Protocol.TCP),
        ({"name": "tls", "port": 443}, model.Protocol.TCP),
        ({"name": "https-x", "port": 443}, model.Protocol.TCP),
        ({"name": "mysql", "port": 3306}, model.Protocol.TCP),
        ({"name": "HTTP2-upper", "port": 80}, model.Protocol.HTTP2),
        ({"name": "tcp-x", "port": 80, "appProtocol": "http"}, model.Protocol.HTTP),  # appProtocol first
        ({"name": "web", "port": 80, "appProtocol": "HTTP"}, model.Protocol.HTTP),
        ({"name": "web", "port": 80, "appProtocol": "kubernetes.io/ws"}, model.Protocol.HTTP),
        ({"name": "http", "port": 80, "appProtocol": "kubernetes.io/h2c"}, model.Protocol.HTTP2),
        ({"name": "http", "port": 80, "appProtocol": "http2"}, model.Protocol.HTTP2),
        ({"name": "http", "port": 80, "appProtocol": "grpc"}, model.Protocol.GRPC),
        ({"name": "http", "port": 80, "appProtocol": "https"}, model.Protocol.TCP),
        ({"name": "http", "port": 80, "appProtocol": "tls"}, model.Protocol.TCP),
        ({"name": "http", "port": 443, "appProtocol": "kubernetes.io/wss"}, model.Protocol.TCP),
        # an appProtocol we do not know is a protocol we do not speak, whatever the name says (as Istio)
        ({"name": "grpc", "port": 80, "appProtocol": "example.com/custom"}, model.Protocol.TCP),
        ({"name": "http", "port": 80, "appProtocol": ""}, model.Protocol.HTTP),  # empty: not given
    ],
)
def test_protocol(port: dict[str, Any], protocol: model.Protocol) -> None:
    record = kubemodel.service_record(svc(ports=[{**port, "protocol": "TCP"}]))
    assert record is not None
    assert record.ports == (model.ServicePort(port["name"], port["port"], protocol),)


def test_external_name_and_udp() -> None:
    assert kubemodel.service_record(svc(type="ExternalName", externalName="example.com")) is None
    record = kubemodel.service_record(svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                 {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]))
    assert record is not None
    assert [p.name for p in record.ports] == ["dns-tcp"]


@pytest.mark.parametrize(
    ("service_ports", "slice_ports", "endpoint_ports"),
    [
        ([("http", 80)], [("http", 8080)], (("http", 8080),)),
        ([("http", 80), ("grpc", 90)], [("grpc", 9090), ("http", 8080)], (("grpc", 9090), ("http", 8080))),
        ([("", 80)], [(None, 8080)], (("", 8080),)),  # unnamed service port, unnamed slice port
        ([("http", 80)], [(None, 8080)], (("http", 8080),)),  # unnamed slice port: the single service port
        ([("http", 80)], [("other", 1)], ()),  # a port the service does not have
        ([("http", 80), ("grpc", 90)], [(None, 8080), ("http", 8081)], (("http", 8081),)),  # ambiguous: skipped
    ],
)
def test_port_mapping(service_ports: list[tuple[str, int]], slice_ports: list[tuple[str | None, int]],
                      endpoint_ports: tuple[tuple[str, int], ...]) -> None:
    service = svc(ports=[{"name": n, "port": p, "protocol": "TCP"} for n, p in service_ports])
    sl = eps(ports=[{"name": n, "port": p} if n is not None else {"port": p} for n, p in slice_ports])
    out = translate(service, sl, nodes=[node()])
    assert out.endpoints[0].ports == endpoint_ports
    by_name = {"http": model.Protocol.HTTP, "grpc": model.Protocol.GRPC, "": model.Protocol.TCP}
    assert out.ports == tuple(model.ServicePort(n, p, by_name[n]) for n, p in service_ports)


def test_merged_over_slices_deduplicated_and_sorted() -> None:
    a = eps("web-a", endpoints=[ep("10.0.0.9"), ep("10.0.0.2", ready=False)])
    b = eps("web-b", endpoints=[ep("10.0.0.2"), ep("10.0.0.10")])  # 10.0.0.2 moving between slices
    out = translate(svc(), b, a, nodes=[node()])
    assert [(e.address, e.health) for e in out.endpoints] == [
        ("10.0.0.10", model.Health.HEALTHY), ("10.0.0.2", model.Health.HEALTHY), ("10.0.0.9", model.Health.HEALTHY)
    ]
    assert translate(svc(), a, b, nodes=[node()]) == out  # order of slices does not matter


def test_labels_from_pods_when_watched() -> None:
    sl = eps(endpoints=[ep("10.0.0.1", pod="web-1"), ep("10.0.0.2", pod="gone"), ep("10.0.0.3")])
    out = translate(svc(), sl, nodes=[node()], pods={"web-1": {"version": "v1", "app": "web"}})
    assert [e.labels for e in out.endpoints] == [(("app", "web"), ("version", "v1")), (), ()]
    assert all(e.labels == () for e in translate(svc(), sl, nodes=[node()]).endpoints)  # pods not watched


def test_same_values_as_the_file_source() -> None:
    """One policy for both sources: a Kubernetes service comes out as the equivalent endpoint file would."""
    from meshplane.discovery import fileparse

    _, from_file = fileparse.parse(
        "cluster: c1\nregion: eu\nservices:\n"
        "  - {name: web, namespace: shop, ports: [{name: http, port: 80}], endpoints: ["
        "{address: 10.0.0.1, ports: {http: 8080}, zone: eu-a, labels: {version: v1}}]}\n",
        path="x.yaml",
    )
    from_kube = translate(svc(), eps(endpoints=[ep(pod="web-1")]), nodes=[node()], pods={"web-1": {"version": "v1"}})
    assert from_kube == from_file[model.service_key("shop", "web")]


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        (eps(endpoints=[ep(None), ep("10.0.0.2")]), "slice endpoint without addresses skipped"),
        (eps(address_type="FQDN"), "FQDN endpoint slice skipped"),
        (eps(address_type="IPv5"), "unknown address type, slice skipped"),
        (eps(ports=[{"name": "http"}]), "slice port without a number skipped"),
        (node(region=None, zone=None), "node without topology labels"),
    ],
)
def test_bad_data_logged_once(obj: dict[str, Any], problem: str) -> None:
    problems = kubemodel.Problems(cluster="c1")
    decode = kubemodel.node_record if "addressType" not in obj else kubemodel.slice_record
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):  # five events about the same object
            decode(obj, problems)
    assert [entry["event"] for entry in logs] == [problem]
    assert logs[0]["cluster"] == "c1"
    name = obj["metadata"]["name"]
    problems.forget(logs[0]["object"])  # deleted: a new object of that name is reported again
    with structlog.testing.capture_logs() as logs:
        decode(obj, problems)
    assert [entry["event"] for entry in logs] == [problem]
    assert name in logs[0]["object"]


def test_forgetting_one_problem_of_an_object_keeps_its_others() -> None:
    problems = kubemodel.Problems()
    with structlog.testing.capture_logs() as logs:
        problems.report("a", "Service shop/web")
        problems.report("b", "Service shop/web")
        problems.forget("Service shop/web", "a")
        for problem in ("a", "b"):
            problems.report(problem, "Service shop/web")
    assert [entry["event"] for entry in logs] == ["a", "b", "a"]
    assert ("b", "Service shop/web") in problems


def test_bad_slices_are_skipped_not_fatal() -> None:
    problems = kubemodel.Problems()
    assert kubemodel.slice_record(eps(address_type="FQDN"), problems) is None
    assert kubemodel.slice_record(eps(service=None), problems) is None  # not a Service's slice: ignored silently
    out = translate(svc(), eps(endpoints=[ep(None), ep("10.0.0.2")]), nodes=[node()], problems=problems)
    assert [e.address for e in out.endpoints] == ["10.0.0.2"]


def test_unnamed_port_on_multi_port_service_logged_once() -> None:
    problems = kubemodel.Problems()
    service = svc(ports=[{"name": "http", "port": 80}, {"name": "grpc", "port": 90}])
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            translate(service, eps(ports=[{"port": 8080}]), nodes=[node()], problems=problems)
    assert [entry["event"] for entry in logs] == ["slice port without a name on a multi-port service skipped"]


def test_records_ignore_what_we_do_not_keep() -> None:
    """A heartbeat or status change compares equal, so the reflector drops it."""
    a, b = node(), node()
    b["status"] = {"conditions": [{"type": "Ready", "lastHeartbeatTime": "now"}]}
    b["metadata"]["resourceVersion"] = "99"
    assert kubemodel.node_record(a) == kubemodel.node_record(b)
    assert kubemodel.object_key(a) == "n1"
    assert kubemodel.object_key(eps()) == "shop/web-abc"


@pytest.mark.parametrize(("version", "other", "expected"), [
    ("12", "12", True), ("13", "12", True), ("9", "10", False),  # numbers, not strings: "9" > "10" as text
    ("123456789012345678901234567890", "2", True),  # no limit on length
    ("", "12", None), ("12", "", None), ("012", "12", None), ("0", "1", None), ("a1", "1", None),
    ("١٢", "1", None),  # decimal digits, but not ASCII ones
])
def test_resource_versions_compare_as_kubernetes_defines_it(version: str, other: str, expected: bool | None) -> None:
    assert kubemodel.version_at_least(version, other) is expected
