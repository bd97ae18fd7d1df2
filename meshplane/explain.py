"""Explain and what-if: where a client's traffic for a service goes, which rule put each group of endpoints
where it is, and where it would go if some endpoints failed (`meshplane explain`, `/debug/explain`).

The answer comes from the code that builds what is served, not from a
second reading of the rules: the priority table is the generators' own
(`sidecar.ranked`, `gateway.ranked`), the traffic shares are computed from
the very ClusterLoadAssignment the generator serves that client, and a
gateway's route is the first of `routeconfig.ordered` that matches the
request. What-if (`down`) marks endpoints failed as outlier detection
would eject them, and computes how Envoy then shares the load between
priorities: its documented priority-load algorithm, with the
overprovisioning factor the assignment carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from meshplane import forms
from meshplane.discovery import model
from meshplane.policy import placement, routing, rules
from meshplane.xds import routeconfig, translate
from meshplane.xds.generators import gateway as gateway_gen
from meshplane.xds.generators import sidecar as sidecar_gen

ENVOY_OVERPROVISIONING = 140  # Envoy's overprovisioning factor (percent) where an assignment sets none
_SERVING = (health_check_pb2.HEALTHY, health_check_pb2.UNKNOWN)  # what Envoy counts as healthy


class ExplainError(ValueError):
    """A question that cannot be answered as asked; the message says why. `parameter`: the page's
    parameter the message begins with, if it is about one (the command line names its flag instead)."""

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class Down:
    """Endpoints supposed failed: by zone, cluster, region, or one endpoint's address (ADDR[:PORT])."""

    what: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Down:
        try:
            what, value = forms.down(text)
        except forms.FormError as exc:
            raise ExplainError(f"down {exc}", parameter="down") from None
        return cls(what, value)

    def covers(self, where: base_pb2.Locality, address: str, port: int) -> bool:
        return self._covers(model.Locality(where.region, where.zone, where.sub_zone), address, (port,))

    def covers_endpoint(self, ep: model.Endpoint) -> bool:
        return self._covers(ep.locality, ep.address, tuple(port for _, port in ep.ports))

    def _covers(self, where: model.Locality, address: str, ports: tuple[int, ...]) -> bool:
        if self.what != "endpoint":
            return bool(getattr(where, self.what) == self.value)
        want, want_port = forms.address_and_port(self.value)
        return address == want and (want_port is None or want_port in ports)


def check_down(down: Sequence[Down], services: Mapping[model.ServiceKey, model.Service]) -> None:
    """Refuse a `down` that matches nothing in the catalog, naming what exists: a misspelt zone
    would otherwise answer "nothing changes"."""
    endpoints = [ep for s in services.values() for ep in s.endpoints]
    for d in down:
        if any(d.covers_endpoint(ep) for ep in endpoints):
            continue
        if d.what == "endpoint":
            raise ExplainError(f"down endpoint={d.value}: no endpoint in the catalog is at {d.value} "
                               "(`meshplane explain SERVICE` lists a service's endpoints)", parameter="down")
        known = sorted({getattr(ep.locality, d.what) for ep in endpoints} - {""})
        raise ExplainError(f"down {d.what}={d.value}: no endpoint of the catalog is in that {d.what} "
                           f"({d.what}s: {', '.join(known) or 'none'})", parameter="down")


def locality(text: str, services: Mapping[model.ServiceKey, model.Service]) -> model.Locality:
    """REGION/ZONE/CLUSTER; a missing region (or cluster) is taken from the endpoints the catalog has
    in that zone, or refused: a locality without a region ranks nothing."""
    if not text:
        raise ExplainError("give the client's locality: from=REGION/ZONE/CLUSTER (or a zone alone)",
                           parameter="from")
    try:
        region, zone, cluster = forms.origin(text)
    except forms.FormError as exc:
        raise ExplainError(f"from {exc}", parameter="from") from None
    if region:
        return model.Locality(region, zone, cluster)
    seen = {ep.locality for s in services.values() for ep in s.endpoints if ep.locality.zone == zone}
    regions = {loc.region for loc in seen}
    if len(regions) != 1:
        found = ", ".join(sorted(regions)) or "none"
        raise ExplainError(f"from {text!r}: zone {zone!r} alone does not say the region (regions seen with it: "
                           f"{found}); give REGION/ZONE/CLUSTER", parameter="from")
    clusters = {loc.cluster for loc in seen}
    return model.Locality(regions.pop(), zone, cluster or (clusters.pop() if len(clusters) == 1 else ""))


PARAMETERS = ("service", "from", "label", "down", "gateway", "host", "path", "header", "method")
"""/debug/explain's query parameters: `meshplane explain`'s flags."""


def from_query(
    services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, query: Mapping[str, str], *,
    running: Callable[[str], str],
) -> dict[str, Any]:
    """/debug/explain: the answer to its query (repeated values joined by commas); `running(gateway)` is
    where a connected proxy of that gateway runs, its default `from`. What the command line refuses
    is refused here too, naming the parameter: scripts read this page directly."""
    def many(name: str) -> list[str]:
        return [v for v in query.get(name, "").split(",") if v]

    def pairs(name: str, form: str) -> dict[str, str]:
        split = [item.partition("=") for item in many(name)]
        bad = next(("".join(p) for p in split if not (p[0] and p[1])), None)
        if bad is not None:
            raise ExplainError(f"{name} {bad!r}: write {form}", parameter=name)
        return {k: v for k, _, v in split}

    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
        raise ExplainError(f"unknown parameter {unknown[0]!r} (parameters: {', '.join(PARAMETERS)})")
    name = query.get("gateway", "")
    if not name and not query.get("service"):
        raise ExplainError("give service=NAMESPACE/NAME, or gateway=NAME (with host, path, header)")
    if name and query.get("service"):
        raise ExplainError("give a service, or a gateway (with host, path, header, method): not both")
    if name and "label" in query:
        raise ExplainError("label is a sidecar client's: a gateway's placement reads none")
    gateway_only = sorted(set(query) & {"host", "path", "header", "method"})
    if not name and gateway_only:
        raise ExplainError(f"{gateway_only[0]} is for a request at a gateway: give gateway=NAME")
    down = [Down.parse(d) for d in many("down")]
    if name:
        return gateway(services, policy, name=name, origin=query.get("from") or running(name),
                       host=query.get("host", ""), path=query.get("path", "/"),
                       headers=pairs("header", "NAME=VALUE"), method=query.get("method", "GET"), down=down)
    return sidecar(services, policy, service=query["service"], origin=query.get("from", ""),
                   labels=pairs("label", "KEY=VALUE"), down=down)


def service_key(name: str) -> model.ServiceKey:
    return model.ServiceKey(name if "/" in name else f"default/{name}")


def sidecar(
    services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, *, service: str, origin: str,
    labels: Mapping[str, str], down: Sequence[Down],
) -> dict[str, Any]:
    key = service_key(service)
    found = services.get(key)
    if found is None:
        raise ExplainError(f"no service {key} in the catalog")
    client = locality(origin, services)
    check_down(down, services)
    origin_ = sidecar_gen.Origin(client, tuple(sorted(labels.items())))
    served = sidecar_gen.ASSIGNMENTS.build(found, policy, origin_) or {}
    port = next((p for p in found.ports if p.protocol != model.Protocol.TCP), None)
    cla = served.get(translate.cluster_name(found, port)) if port is not None else None
    return {"service": key, "from": str(client), "labels": dict(labels), "down": [f"{d.what}={d.value}" for d in down],
            **_table(sidecar_gen.ranked(found, policy, origin_), cla, down)}


def gateway(
    services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, *, name: str, origin: str,
    host: str, path: str, headers: Mapping[str, str], method: str, down: Sequence[Down],
) -> dict[str, Any]:
    found = policy.gateway(name)
    if found is None:
        raise ExplainError(f"no gateway {name!r} in the policy (gateways: "
                           f"{', '.join(g.name for g in policy.gateways) or 'none'})")
    client = locality(origin, services) if origin else model.Locality()
    check_down(down, services)
    request_path, _, query = path.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    lowered = {k.lower(): v for k, v in headers.items()}
    hostname = routing.without_port(host)  # as the gateway matches: whatever port the Host has
    for port in sorted({ln.port for ln in found.listeners}):
        for listener in (ln for ln in found.listeners if ln.port == port):
            attached = [r for r in policy.gateway_routes(name)
                        if any(p.kind == "Gateway" and p.name == name and p.section in (None, listener.name)
                               for p in r.parents)
                        and any(_host_matches(h, hostname) for h in routing.hostnames_for(listener, r))]
            for route, i, j, match in routeconfig.ordered(attached):
                if _matches(match, request_path, params, lowered, method):
                    rule = route.rules[i]
                    out = {"gateway": name, "host": host, "path": path, "from": str(client),
                           "down": [f"{d.what}={d.value}" for d in down],
                           "matched": {"route": route.key, "rule": i, "match": j, "port": port}}
                    if rule.redirect is not None:
                        return {**out, "backends": [],
                                "note": f"the gateway answers {rule.redirect.status_code}: a RequestRedirect"}
                    return {**out, "backends": [_backend(services, policy, b, gateway_gen.Place(name, client), down)
                                                for b in rule.backends]}
    return {"gateway": name, "host": host, "path": path, "matched": None, "backends": [],
            "note": "no route matches: the gateway answers 404"}


def _backend(services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, backend: routing.Backend,
             where: gateway_gen.Place, down: Sequence[Down]) -> dict[str, Any]:
    upstream = translate.backend_cluster_name(backend)  # Envoy's cluster for the backend
    out: dict[str, Any] = {"upstream": upstream, "weight": backend.weight}
    service = services.get(backend.service)
    if service is None:
        return {**out, "placements": [], "traffic": [], "note": f"no service {backend.service}: 503"}
    served = gateway_gen.ASSIGNMENTS.build(service, policy, where) or {}
    return {**out, **_table(gateway_gen.ranked(service, policy, where, backend), served.get(upstream), down)}


def _host_matches(pattern: str, host: str) -> bool:
    return pattern == "*" or routing.hostname_matches(pattern, host) or pattern == host


def _matches(match: routing.Match, path: str, params: Mapping[str, str], headers: Mapping[str, str],
             method: str) -> bool:
    """Envoy's route matching of a request, for one match (the RE2 dialect is close enough to Python's
    for the expressions the validator lets through)."""
    want = match.path
    if want.kind == routing.PathKind.EXACT and path != want.value:
        return False
    if want.kind == routing.PathKind.PREFIX:
        prefix = want.value.rstrip("/")
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return False
    if want.kind == routing.PathKind.REGEX and not re.fullmatch(want.value, path):
        return False
    if match.method is not None and match.method != method.upper():
        return False
    for header in match.headers:
        if not _value(header, headers.get(header.name.lower())):
            return False
    return all(_value(param, params.get(param.name)) for param in match.query_params)


def _value(match: routing.ValueMatch, value: str | None) -> bool:
    if value is None:
        return False
    return value == match.value if match.kind == routing.ValueKind.EXACT else bool(re.fullmatch(match.value, value))


def _table(placed: Sequence[placement.Placement], cla: endpoint_pb2.ClusterLoadAssignment | None,
           down: Sequence[Down]) -> dict[str, Any]:
    rows = []
    for p in placed:
        rows.append({
            "priority": p.priority, "locality": str(p.locality), "weight": p.weight, "reason": p.reason,
            "endpoints": [{"address": e.address, "ports": dict(e.ports), "health": e.health.value,
                           "down": any(d.covers_endpoint(e) for d in down)} for e in p.endpoints],
        })
    out: dict[str, Any] = {"placements": rows, "traffic": priority_load(cla, down) if cla is not None else []}
    if cla is None:
        out["note"] = "no assignment is served for it (TCP only: its traffic does not go through Envoy's HTTP routes)"
    return out


def priority_load(cla: endpoint_pb2.ClusterLoadAssignment, down: Sequence[Down]) -> list[dict[str, Any]]:
    """How Envoy shares a cluster's requests between its priorities, given an assignment: each
    priority's health is its healthy hosts times the overprovisioning factor, at most 100 %; when
    the sum is under 100 % the healths are normalised; then each priority takes its health's worth
    of what the ones before it left. Endpoints `down` count as ejected (unhealthy)."""
    factor = cla.policy.overprovisioning_factor.value if cla.policy.HasField("overprovisioning_factor") \
        else ENVOY_OVERPROVISIONING
    hosts: dict[int, tuple[int, int]] = {}
    for group in cla.endpoints:
        healthy, total = hosts.get(group.priority, (0, 0))
        for lb in group.lb_endpoints:
            address = lb.endpoint.address.socket_address
            up = lb.health_status in _SERVING and not any(
                d.covers(group.locality, address.address, address.port_value) for d in down)
            healthy, total = healthy + up, total + 1
        hosts[group.priority] = (healthy, total)
    health = {pri: min(100.0, factor * up / total) if total else 0.0 for pri, (up, total) in sorted(hosts.items())}
    total_health = min(100.0, sum(health.values()))
    if total_health == 0:
        return []
    remaining, out = 100.0, []
    for pri, h in health.items():
        share = min(h * 100 / total_health, remaining)
        remaining -= share
        if share > 0:
            out.append({"priority": pri, "share": round(share, 1)})
    return out
