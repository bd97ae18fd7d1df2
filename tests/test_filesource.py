"""Endpoint files: every problem as `file:line: field: reason` (all of them, not only the first), what is
refused (what Envoy would NACK, what would silently be lost), a port's protocol, and the parse entry by
entry saying exactly what the whole-file parse says."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshplane.discovery import fileparse, model

HEAD = "cluster: c1\nregion: r1\nservices:\n"
WEB = HEAD + "- name: web\n  ports: [{name: http, port: 8000}]\n  endpoints:\n"
"""A one-port service; the endpoint written after it is on line 7."""
TWO_PORTS = HEAD + "- name: web\n  ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]\n  endpoints:\n"


def problems(text: str) -> list[str]:
    """What `meshplane validate` prints for `text`; the parse entry by entry and the whole-file parse agree."""
    with pytest.raises(fileparse.EndpointFileError) as entries:
        fileparse.parse(text, path="c1.yaml")
    with pytest.raises(fileparse.EndpointFileError) as whole:
        fileparse.parse_whole(text, path="c1.yaml")
    found = [str(p) for p in entries.value.problems]
    assert found == [str(p) for p in whole.value.problems]
    assert str(entries.value) == "\n".join(found)
    return found


def parsed(text: str) -> dict[model.ServiceKey, model.ServiceInCluster]:
    _, services = fileparse.parse(text, path="c1.yaml")
    assert fileparse.parse_whole(text, path="c1.yaml")[1] == services
    return services


# --- what the issue found: each problem with its line -----------------------------------------------------


def test_every_problem_of_a_file_is_reported_with_its_line() -> None:
    text = (HEAD + "- name: mockb\n  ports: [{name: http, port: 8000}]\n  endpoint:\n"
            "  - {address: 10.0.0.1, zone: z1}\n- name: web\n  ports: [{name: http, port: 8000}]\n  endpoints:\n"
            "  - address: 10.0.0.300\n    helth: healthy\n    zon: z1\n")
    assert problems(text) == [
        "c1.yaml:6: services[0].endpoint: unknown field 'endpoint'; did you mean 'endpoints'?",
        "c1.yaml:11: services[1].endpoints[0].address: '10.0.0.300' is not an IPv4 or IPv6 address",
        "c1.yaml:11: services[1].endpoints[0].zone: required field 'zone' is missing (the endpoint's zone: "
        "failover goes to the nearest zone first)",
        "c1.yaml:12: services[1].endpoints[0].helth: unknown field 'helth'; did you mean 'health'?",
        "c1.yaml:13: services[1].endpoints[0].zon: unknown field 'zon'; did you mean 'zone'?",
    ]


CASES = [
    # addresses: what Envoy NACKs ("malformed IP address"), and what no proxy can reach
    pytest.param(WEB + "  - {address: 10.0.0.300, zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: '10.0.0.300' is not an IPv4 or IPv6 address",
                 id="ipv4-octet"),
    pytest.param(WEB + "  - {address: 010.0.0.1, zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: '010.0.0.1' is not an IPv4 or IPv6 address",
                 id="ipv4-leading-zero"),
    pytest.param(WEB + "  - {address: '2001:db8::g', zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: '2001:db8::g' is not an IPv4 or IPv6 address",
                 id="ipv6"),
    pytest.param(WEB + "  - {address: mockb.default.svc, zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: 'mockb.default.svc' is not an IP address: Envoy is "
                 "sent endpoints by IP address and resolves no names here; give the address the name resolves to",
                 id="hostname"),
    pytest.param(WEB + "  - {address: 'fe80::1%eth0', zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: 'fe80::1%eth0': a scope (%eth0) names a network "
                 "interface of one machine, and proxies elsewhere have no such interface (Envoy NACKs it); give the "
                 "address without it", id="ipv6-scope"),
    pytest.param(WEB + "  - {address: 0.0.0.0, zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: '0.0.0.0' is the unspecified address: no endpoint can "
                 "be reached there", id="unspecified"),
    pytest.param(WEB + "  - {address: 'ff02::1', zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: 'ff02::1' is a multicast address: no endpoint can be "
                 "reached there", id="multicast"),
    pytest.param(WEB + "  - {zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: required field 'address' is missing", id="no-address"),
    pytest.param(WEB + "  - {address: 167772161, zone: z1}\n",
                 "c1.yaml:7: services[0].endpoints[0].address: must be a string, got 167772161 (YAML reads it as a "
                 "number: quote it)", id="address-number"),
    # ports
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, port: 99999}\n",
                 "c1.yaml:7: services[0].endpoints[0].port: 99999 is not a port number (1-65535)", id="port-range"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, port: '8080'}\n",
                 "c1.yaml:7: services[0].endpoints[0].port: must be a whole number (a port, 1-65535), got '8080'",
                 id="port-text"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http, port: 0}]\n",
                 "c1.yaml:5: services[0].ports[0].port: 0 is not a port number (1-65535)", id="service-port-zero"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http}]\n",
                 "c1.yaml:5: services[0].ports[0].port: required field 'port' is missing", id="service-port-missing"),
    pytest.param(TWO_PORTS + "  - {address: 10.0.0.1, zone: z1, port: 8080}\n",
                 "c1.yaml:7: services[0].endpoints[0].port: the service has several ports (http, grpc): give ports: "
                 "{name: number} instead", id="port-of-several"),
    pytest.param(TWO_PORTS + "  - {address: 10.0.0.1, zone: z1, ports: {htp: 8080}}\n",
                 "c1.yaml:7: services[0].endpoints[0].ports.htp: 'htp' is not a port of the service; did you mean "
                 "'http'?", id="ports-name"),
    pytest.param(TWO_PORTS + "  - {address: 10.0.0.1, zone: z1, ports: {admin: 8080}}\n",
                 "c1.yaml:7: services[0].endpoints[0].ports.admin: 'admin' is not a port of the service (its ports: "
                 "http, grpc)", id="ports-name-far"),
    pytest.param(TWO_PORTS + "  - {address: 10.0.0.1, zone: z1, ports: {}}\n",
                 "c1.yaml:7: services[0].endpoints[0].ports: must map at least one of the service's port names to the "
                 "port this endpoint listens on, got a mapping", id="ports-empty"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, port: 8080, ports: {http: 8080}}\n",
                 "c1.yaml:7: services[0].endpoints[0].ports: give port (a one-port service) or ports (by port name), "
                 "not both", id="port-and-ports"),
    pytest.param(HEAD + "- name: web\n  ports:\n  - {name: http, port: 8000}\n  - {name: http, port: 8001}\n",
                 "c1.yaml:7: services[0].ports[1].name: duplicate port name 'http' (first at line 6)",
                 id="port-name-twice"),
    pytest.param(HEAD + "- name: web\n  ports:\n  - {name: http, port: 8000}\n  - {name: web, port: 8000}\n",
                 "c1.yaml:7: services[0].ports[1].port: duplicate port 8000: each port number is one Envoy cluster "
                 "(first at line 6)", id="port-number-twice"),
    pytest.param(HEAD + "- name: web\n", "c1.yaml:4: services[0].ports: required field 'ports' is missing: a service "
                 "has at least one port", id="no-ports"),
    pytest.param(HEAD + "- name: web\n  ports: []\n",
                 "c1.yaml:5: services[0].ports: must not be empty: a service has at least one port", id="ports-none"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http, port: 80, protocol: UDP}]\n",
                 "c1.yaml:5: services[0].ports[0].protocol: 'UDP' is not one of HTTP, HTTP2, GRPC, TCP",
                 id="protocol"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http, port: 80, protcol: HTTP}]\n",
                 "c1.yaml:5: services[0].ports[0].protcol: unknown field 'protcol'; did you mean 'protocol'?",
                 id="port-unknown-key"),
    # locality: a zone is required; nothing that would make a locality nobody wrote
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: ''}\n",
                 "c1.yaml:7: services[0].endpoints[0].zone: must not be empty", id="zone-empty"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: cn/h}\n",
                 "c1.yaml:7: services[0].endpoints[0].zone: 'cn/h' must not contain '/' or '*': a locality is written "
                 "region/zone/cluster and '*' is a wildcard in policies", id="zone-slash"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: 1}\n",
                 "c1.yaml:7: services[0].endpoints[0].zone: must be a string, got 1 (YAML reads it as a number: quote "
                 "it)", id="zone-number"),
    pytest.param("region: r1\nservices: []\n",
                 "c1.yaml:1: cluster: required field 'cluster' is missing (the cluster's id, which proxies see as "
                 "their sub_zone)", id="no-cluster"),
    pytest.param("cluster: c1\nservices: []\n",
                 "c1.yaml:1: region: required field 'region' is missing (the region of every endpoint in the file)",
                 id="no-region"),
    pytest.param("cluster: c1\nregion: no\n",
                 "c1.yaml:2: region: must be a string, got False (YAML reads yes/no/on/off/true/false as booleans: "
                 "quote it)", id="region-bool"),
    # the rest of an endpoint
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, health: sick}\n",
                 "c1.yaml:7: services[0].endpoints[0].health: 'sick' is not one of healthy, draining, unhealthy",
                 id="health"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, weight: 0}\n",
                 "c1.yaml:7: services[0].endpoints[0].weight: 0 must be a whole number from 1 to 128", id="weight"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, weight: true}\n",
                 "c1.yaml:7: services[0].endpoints[0].weight: True must be a whole number from 1 to 128",
                 id="weight-bool"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, labels: [version]}\n",
                 "c1.yaml:7: services[0].endpoints[0].labels: must be a mapping of label names to values, got a list",
                 id="labels"),
    pytest.param(WEB + "  - address: 10.0.0.1\n    zone: z1\n    labels:\n      version: 1.10\n",
                 "c1.yaml:10: services[0].endpoints[0].labels.version: must be a string, got 1.1 (YAML reads it as a "
                 "number: quote it)", id="label-number"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1}\n  - {address: 10.0.0.2, zone: z1}\n"
                 "  - {address: 10.0.0.1, zone: z2}\n",
                 "c1.yaml:9: services[0].endpoints[2].address: duplicate endpoint 10.0.0.1:8000 for port 'http' "
                 "(first at line 7)", id="endpoint-twice"),
    pytest.param(WEB + "  - {address: '2001:db8::1', zone: z1, port: 80}\n  - {address: '2001:DB8:0::1', zone: z2, "
                 "port: 80}\n", "c1.yaml:8: services[0].endpoints[1].address: duplicate endpoint [2001:db8::1]:80 for "
                 "port 'http' (first at line 7)", id="ipv6-twice-written-apart"),
    pytest.param(WEB + "  - 10.0.0.1\n",
                 "c1.yaml:7: services[0].endpoints[0]: an endpoint is a mapping (address, port, zone, ...), got "
                 "'10.0.0.1'", id="endpoint-text"),
    # services
    pytest.param(HEAD + "- name: Web_1\n  ports: [{name: http, port: 80}]\n",
                 "c1.yaml:4: services[0].name: 'Web_1' is not a Kubernetes name: at most 63 lowercase letters, digits "
                 "and '-', starting and ending with a letter or digit", id="name"),
    pytest.param(HEAD + "- ports: [{name: http, port: 80}]\n",
                 "c1.yaml:4: services[0].name: required field 'name' is missing", id="no-name"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http, port: 80}]\n- name: api\n  ports: [{name: http, port: "
                 "80}]\n- name: web\n  ports: [{name: http, port: 81}]\n",
                 "c1.yaml:8: services[2].name: duplicate service default/web (first at line 4)", id="service-twice"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http, port: 80}]\n  endpoints: {address: 10.0.0.1}\n",
                 "c1.yaml:6: services[0].endpoints: must be a list, got a mapping", id="endpoints-mapping"),
    pytest.param("cluster: c1\nregion: r1\nservices: {name: web}\n",
                 "c1.yaml:3: services: must be a list of services, got a mapping", id="services-mapping"),
    pytest.param("cluster: c1\nregion: r1\nservice:\n- name: web\n",
                 "c1.yaml:3: service: unknown field 'service'; did you mean 'services'?", id="top-unknown-key"),
    pytest.param("cluster: c1\nregion: r1\nzone: z1\n",
                 "c1.yaml:3: zone: unknown field 'zone'; known fields here: cluster, region, services",
                 id="top-unknown-key-far"),
    # the document
    pytest.param("", "c1.yaml:1: (document): the file is empty: an endpoint file gives cluster, region and services",
                 id="empty"),
    pytest.param("- cluster: c1\n", "c1.yaml:1: (document): an endpoint file is a mapping (cluster, region, "
                 "services), got a list", id="a-list"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, zone: z2}\n",
                 "c1.yaml:7: services[0].endpoints[0].zone: duplicate key 'zone' (first at line 7)",
                 id="key-twice"),
    pytest.param(WEB + "  - {address: 10.0.0.1, zone: z1, 1: x}\n",
                 "c1.yaml:7: services[0].endpoints[0]: keys must be strings, got 1", id="key-number"),
    pytest.param(HEAD + "- name: web\n  ports: [{name: http, port: 8000}\n",
                 "c1.yaml:6: (document): invalid YAML: while parsing a flow sequence did not find expected ',' or ']' "
                 "(column 1)", id="yaml-one-line"),
    pytest.param("cluster: c1\nregion: r1\x07\n",
                 "c1.yaml:2: (document): invalid YAML: unacceptable character #x0007: control characters are not "
                 "allowed (column 11)", id="control-character"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_each_problem_with_its_line(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_lines_are_the_files_after_the_list_and_between_entries() -> None:
    """The parse entry by entry places a problem in the file, not in the entry or in the file without its list."""
    text = ("# the cluster\ncluster: c1\nservices:\n\n# first\n- name: a\n  ports: [{name: http, port: 80}]\n\n"
            "# second, broken\n- name: b\n  ports: [{name: http, port: 80}]\n  endpoints:\n"
            "  - {address: 10.0.0.1, zone: z1, wieght: 2}\n# after the list\nregoin: r1\n")
    assert problems(text) == [
        "c1.yaml:2: region: required field 'region' is missing (the region of every endpoint in the file)",
        "c1.yaml:13: services[1].endpoints[0].wieght: unknown field 'wieght'; did you mean 'weight'?",
        "c1.yaml:15: regoin: unknown field 'regoin'; did you mean 'region'?",
    ]


def test_an_edit_is_reported_at_its_line_and_the_last_good_parse_is_untouched() -> None:
    good = yaml.safe_dump({"cluster": "c1", "region": "r1", "services": [
        {"name": f"svc{i}", "ports": [{"name": "http", "port": 80}],
         "endpoints": [{"address": f"10.0.0.{i}", "zone": "z1"}]} for i in range(20)]}, sort_keys=False)
    _, last, _, _ = fileparse.parse_changed(good, path="c1.yaml", last=None)
    bad = good.replace("address: 10.0.0.13", "address: 10.0.0.313")
    line = bad.splitlines().index("  - address: 10.0.0.313") + 1
    with pytest.raises(fileparse.EndpointFileError) as error:
        fileparse.parse_changed(bad, path="c1.yaml", last=last)
    assert str(error.value) == (f"c1.yaml:{line}: services[13].endpoints[0].address: '10.0.0.313' is not an IPv4 or "
                                "IPv6 address")
    assert last.services[model.service_key("default", "svc13")].endpoints[0].address == "10.0.0.13"


def test_what_is_accepted_and_what_it_becomes() -> None:
    services = parsed(
        TWO_PORTS + "  - address: '2001:DB8:0::1'\n    ports: {http: 18080}\n    zone: z1\n"
        "    labels: {version: v1, empty: ''}\n    health: Draining\n    weight: 128\n"
        "  - {address: 10.0.0.2, zone: z2}\n")
    web = services[model.service_key("default", "web")]
    first, second = web.endpoints
    assert first.address == "2001:db8::1"  # as Envoy writes it
    assert first.ports == (("http", 18080),)
    assert first.labels == (("empty", ""), ("version", "v1"))
    assert (first.health, first.weight) == (model.Health.DRAINING, 128)
    assert first.locality == model.Locality(region="r1", zone="z1", cluster="c1")
    assert second.ports == (("grpc", 9000), ("http", 8000))  # neither port nor ports: the service's own
    assert (second.health, second.weight) == (model.Health.HEALTHY, 1)
    assert parsed("cluster: c1\nregion: r1\n") == {}  # a cluster with no services yet
    assert parsed("cluster: c1\nregion: r1\nservices:\n- name: web\n  namespace:\n  ports: [{name: h, port: 1}]\n"
                  "  endpoints:\n")[model.service_key("default", "web")].endpoints == ()


def test_read_names_a_byte_that_is_not_utf8(tmp_path: Any) -> None:
    path = tmp_path / "c1.yaml"
    path.write_bytes(b"cluster: c1\nregion: r\xe9\n")
    with pytest.raises(fileparse.EndpointFileError) as latin1:
        fileparse.read(path)
    assert str(latin1.value) == f"{path}:2: (file): not UTF-8 text: invalid continuation byte"


# --- a port's protocol --------------------------------------------------------------------------------------


def _ports(*ports: dict[str, Any]) -> str:
    return yaml.safe_dump({"cluster": "c1", "region": "r1", "services": [{"name": "web", "ports": list(ports)}]})


def _protocols(*ports: dict[str, Any]) -> list[model.Protocol]:
    services = parsed(_ports(*ports))
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
         "c1.yaml:6: services[0].ports[0].appProtocol: 'http' is HTTP, but protocol says TCP (protocol here is what "
         "Envoy speaks to the port, not Kubernetes' TCP or UDP: give one of the two, or both alike)"),
        ({"name": "web", "port": 80, "protocol": "HTTP", "appProtocol": "grpc"},
         "c1.yaml:6: services[0].ports[0].appProtocol: 'grpc' is GRPC, but protocol says HTTP"),
        ({"name": "web", "port": 80, "appProtocol": ["http"]},
         "c1.yaml:6: services[0].ports[0].appProtocol: must be a string, got a list"),
    ],
)
def test_a_protocol_and_an_app_protocol_that_disagree_are_an_error(port: dict[str, Any], message: str) -> None:
    assert problems(_ports(port))[0].startswith(message)


# --- the parse entry by entry says what the whole-file parse says ---------------------------------------------

_values = st.one_of(st.sampled_from(["10.0.0.1", "10.0.0.300", "::1", "web", "z1", "", "a/b", "healthy", "sick",
                                     "http", "HTTP", "grpc"]),
                    st.integers(-1, 70000), st.booleans(), st.none(), st.just([]), st.just({}))
_keys = st.sampled_from(["address", "port", "ports", "zone", "zon", "labels", "health", "weight", "name",
                         "namespace", "endpoints", "endpoint", "protocol", "appProtocol"])
_endpoints = st.lists(st.dictionaries(_keys, _values, max_size=4).map(
    lambda d: {"address": "10.0.0.1", "zone": "z1", **d}), max_size=3)
_services = st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["web", "api", "Bad_Name"]), "ports": st.just([{"name": "http", "port": 80}]),
     "endpoints": _endpoints}, optional={"namespace": st.sampled_from(["default", "shop", 3]), "helth": _values}),
    max_size=4)
_docs = st.fixed_dictionaries({"cluster": st.sampled_from(["c1", "", 7]), "services": _services},
                              optional={"region": st.sampled_from(["r1", None]), "regon": _values})
# What else a hand-written file holds between entries: comments, blank lines, breaks YAML counts as lines.
_between = st.sampled_from(["", "\n", "# a comment\n", "\n# two\n\n", "# \u2028 a break YAML counts\n"])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_docs, gaps=st.lists(_between, min_size=6, max_size=6), indent=st.sampled_from([0, 2]),
       trailer=st.booleans())
def test_the_parse_entry_by_entry_agrees_with_the_whole_file(doc: dict[str, Any], gaps: list[str], indent: int,
                                                          trailer: bool) -> None:
    services = doc.pop("services")
    text = yaml.safe_dump(doc, sort_keys=False) + "services:\n"
    for service, gap in zip(services, gaps, strict=False):
        item = yaml.safe_dump([service], sort_keys=False)
        text += gap + "".join(" " * indent + line for line in item.splitlines(keepends=True))
    if trailer:
        text += "# after the list\nregoin: r1\n"
    try:
        whole = fileparse.parse_whole(text, path="c1.yaml")
    except fileparse.EndpointFileError as error:
        with pytest.raises(fileparse.EndpointFileError) as entries:
            fileparse.parse(text, path="c1.yaml")
        assert [str(p) for p in entries.value.problems] == [str(p) for p in error.problems], text
    else:
        assert fileparse.parse(text, path="c1.yaml") == whole
