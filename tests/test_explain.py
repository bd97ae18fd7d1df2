"""`meshplane explain`: the priority table a client gets and why, and what-if by Envoy's priority load."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from meshplane import explain
from meshplane.demo import topology
from meshplane.discovery import catalog, fileparse, model
from meshplane.policy import routing, rules, validate

HZ_H = "cn-hangzhou/cn-hangzhou-h/cluster-1"
AP_A = "ap-northeast-1/ap-northeast-1a/cluster-2"


def _s1() -> tuple[dict[model.ServiceKey, model.Service], rules.Policy]:
    topo = topology.Topology.build()
    merged = catalog.Catalog()
    for spec in topo.clusters:
        cluster, services = fileparse.parse(yaml.safe_dump(topo.endpoint_doc(spec)), path=spec.name)
        merged.apply(cluster, services, seen_at=0.0)
    loaded = validate.load_policy_text(topology.demo_policy(gateway_port=8080), path="policy.yaml")
    assert loaded.policy is not None, loaded.errors
    return dict(merged.services), loaded.policy


def _cla(*groups: tuple[int, list[tuple[str, int]]], factor: int | None = None) -> endpoint_pb2.ClusterLoadAssignment:
    """priority -> [(host, health)], health 1 healthy, 0 unhealthy; host a is 10.0.0.1, b 10.0.0.2..."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="c")
    if factor is not None:
        cla.policy.overprovisioning_factor.value = factor
    for priority, hosts in groups:
        group = cla.endpoints.add(priority=priority, locality=base_pb2.Locality(region="r", zone=f"z{priority}"))
        for address, up in hosts:
            lb = group.lb_endpoints.add(health_status=health_check_pb2.HEALTHY if up else health_check_pb2.UNHEALTHY)
            lb.endpoint.address.socket_address.address = f"10.0.0.{ord(address) - ord('a') + 1}"
            lb.endpoint.address.socket_address.port_value = 80
    return cla


@pytest.mark.parametrize(("cla", "down", "shares"), [
    pytest.param(_cla((0, [("a", 1), ("b", 1)]), (1, [("c", 1)])), [], {0: 100.0}, id="healthy-p0-takes-all"),
    # Envoy's docs: P0 at 50 % healthy x 1.4 = 70 %, P1 healthy takes the other 30 %.
    pytest.param(_cla((0, [("a", 1), ("b", 0)]), (1, [("c", 1)])), [], {0: 70.0, 1: 30.0}, id="p0-half-healthy"),
    pytest.param(_cla((0, [("a", 1), ("b", 1)]), (1, [("c", 1)])), ["endpoint=10.0.0.1"], {0: 70.0, 1: 30.0},
                 id="down-counts-as-ejected"),
    pytest.param(_cla((0, [("a", 1), ("b", 1)]), (1, [("c", 1)])), ["zone=z0"], {1: 100.0}, id="zone-down"),
    # Every priority degraded: the healths are normalised (70 + 35 = 105 > 100: not normalised; P1 gets 30).
    pytest.param(_cla((0, [("a", 1), ("b", 0)]), (1, [("c", 1), ("d", 0), ("e", 0), ("f", 0)])), [],
                 {0: 70.0, 1: 30.0}, id="both-degraded"),
    # 1/4 x 1.4 = 35 and 1/4 x 1.4 = 35: 70 in all, normalised to 50/50.
    pytest.param(_cla((0, [("a", 1), ("b", 0), ("c", 0), ("d", 0)]), (1, [("e", 1), ("f", 0), ("g", 0), ("h", 0)])),
                 [], {0: 50.0, 1: 50.0}, id="normalised"),
    # Active-standby's factor: one healthy endpoint of three keeps all of the traffic.
    pytest.param(_cla((0, [("a", 1), ("b", 0), ("c", 0)]), (1, [("d", 1)]), factor=1_000_000), [], {0: 100.0},
                 id="standby-factor"),
    pytest.param(_cla((0, [("a", 1)]), (1, [("b", 1)])), ["endpoint=10.0.0.1", "endpoint=10.0.0.2"], {},
                 id="nothing-left"),
])
def test_priority_load_follows_envoys_algorithm(
    cla: endpoint_pb2.ClusterLoadAssignment, down: list[str], shares: dict[int, float]
) -> None:
    traffic = explain.priority_load(cla, [explain.Down.parse(d) for d in down])
    assert {t["priority"]: t["share"] for t in traffic} == shares


def test_down_is_checked() -> None:
    with pytest.raises(explain.ExplainError, match="zone=Z, cluster=C, region=R or endpoint=ADDR"):
        explain.Down.parse("datacenter=dc1")
    with pytest.raises(explain.ExplainError):
        explain.Down.parse("zone=")
    port = explain.Down.parse("endpoint=10.0.0.1:8080")
    where = base_pb2.Locality(region="r", zone="z", sub_zone="c")
    assert port.covers(where, "10.0.0.1", 8080) and not port.covers(where, "10.0.0.1", 9090)
    assert explain.Down.parse("cluster=c").covers(where, "x", 1)


def test_a_zone_alone_takes_its_region_from_the_catalog_or_is_refused() -> None:
    services, _ = _s1()
    assert str(explain.locality("ap-northeast-1a", services)) == AP_A
    assert str(explain.locality(HZ_H, services)) == HZ_H
    with pytest.raises(explain.ExplainError, match="zone 'nowhere-1a' alone does not say the region"):
        explain.locality("nowhere-1a", services)
    with pytest.raises(explain.ExplainError, match="from=REGION/ZONE/CLUSTER"):
        explain.locality("", services)


def test_sidecar_table_says_which_rule_placed_each_row_and_where_traffic_goes() -> None:
    services, policy = _s1()
    answer = explain.sidecar(services, policy, service="mockb", origin=AP_A, labels={}, down=[])
    rows = [(r["priority"], r["locality"].split("/")[1], r["reason"]) for r in answer["placements"]]
    assert rows == [
        (0, "ap-northeast-1a", "same region, zone and cluster"),
        (1, "ap-northeast-1b", "same region, another zone"),
        (2, "cn-hangzhou-h", "another region"),
        (2, "cn-hangzhou-k", "another region"),
    ]
    assert answer["traffic"] == [{"priority": 0, "share": 100.0}]
    zone_down = explain.sidecar(services, policy, service="mockb", origin=AP_A, labels={},
                                down=[explain.Down.parse("zone=ap-northeast-1a")])
    assert zone_down["traffic"] == [{"priority": 1, "share": 100.0}]
    region_down = explain.sidecar(services, policy, service="mockb", origin=AP_A, labels={},
                                  down=[explain.Down.parse("region=ap-northeast-1")])
    assert region_down["traffic"] == [{"priority": 2, "share": 100.0}]
    with pytest.raises(explain.ExplainError, match="no service default/nope"):
        explain.sidecar(services, policy, service="nope", origin=AP_A, labels={}, down=[])


def _with(locality: str) -> rules.Policy:
    loaded = validate.load_policy_text(
        f"apiVersion: meshplane.io/v1\nservices:\n  - name: mockb\n    locality:\n{locality}", path="policy.yaml")
    assert loaded.policy is not None, loaded.errors
    return loaded.policy


def test_reasons_name_the_failover_rule_and_the_failover_priority_labels() -> None:
    services, _ = _s1()
    three = dict(services)
    key = model.ServiceKey("default/mockb")
    extra = model.Endpoint(address="10.9.0.1", ports=(("http", 8000),),
                           locality=model.Locality("eu-west", "eu-west-1a", "cluster-3"))
    three[key] = dataclasses.replace(services[key], endpoints=(*services[key].endpoints, extra))
    ruled = _with("      failover: [{from: ap-northeast-1, to: eu-west}]\n")
    answer = explain.sidecar(three, ruled, service="mockb", origin=AP_A, labels={}, down=[])
    reasons = {r["locality"].split("/")[0]: (r["priority"], r["reason"]) for r in answer["placements"]}
    assert reasons["eu-west"] == (2, "failover rule: ap-northeast-1 fails over to eu-west")
    assert reasons["cn-hangzhou"] == (3, "another region")

    by_label = _with("      failoverPriority: [topology.istio.io/cluster]\n")
    answer = explain.sidecar(services, by_label, service="mockb", origin=AP_A, labels={}, down=[])
    first = answer["placements"][0]
    assert first["reason"] == "failoverPriority: matches the client on topology.istio.io/cluster"
    assert answer["placements"][-1]["reason"].startswith("failoverPriority: matches the client on none of")


def test_gateway_explains_the_matching_route_and_each_backends_table() -> None:
    services, policy = _s1()
    canary = explain.gateway(services, policy, name="edge", origin="", host="example.com", path="/mocka",
                             headers={"Canary": "cluster-2"}, method="GET", down=[])
    assert canary["matched"]["rule"] == 1
    (backend,) = canary["backends"]
    assert {r["locality"].split("/")[2] for r in backend["placements"]} == {"cluster-2"}
    standby = explain.gateway(services, policy, name="edge", origin="", host="example.com", path="/standby",
                              headers={}, method="GET", down=[explain.Down.parse("cluster=cluster-1")])
    (backend,) = standby["backends"]
    reasons = {r["locality"].split("/")[2]: r["reason"] for r in backend["placements"]}
    assert reasons["cluster-1"] == "active-standby: cluster-1 is #1 of cluster-1, cluster-2"
    assert backend["traffic"] == [{"priority": 1, "share": 100.0}]
    missing = explain.gateway(services, policy, name="edge", origin="", host="example.com", path="/nothing",
                              headers={}, method="GET", down=[])
    assert missing["matched"] is None
    # As the gateway matches: a port in the Host is ignored (also an IPv6 address's).
    with_port = explain.gateway(services, policy, name="edge", origin="", host="example.com:8080", path="/mocka",
                                headers={}, method="GET", down=[])
    assert with_port["matched"] is not None and with_port["matched"]["rule"] == 0
    assert routing.without_port("[::1]:8080") == "[::1]" and routing.without_port("[::1]") == "[::1]"
    assert routing.without_port("example.com") == "example.com"
    with pytest.raises(explain.ExplainError, match="no gateway 'west' in the policy"):
        explain.gateway(services, policy, name="west", origin="", host="h", path="/", headers={}, method="GET",
                        down=[])
