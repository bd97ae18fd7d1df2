"""Which endpoints a client prefers: Envoy priorities and locality weights, per client locality.

A pure function of (endpoints, client, settings), so that it can be tested
with tables and its output content-hashed: same input, same tuple.

The semantics are Istio's (pilot/pkg/networking/core/loadbalancer/loadbalancer.go:
ApplyLocalityLoadBalancer, applyLocalityFailover, applyFailoverPriorities,
applyLocalityWeights; util.LbPriority, util.LocalityMatch), so that operators'
DestinationRule habits carry over. What Istio does, and where we differ:

- `distribute` and failover are alternatives: when `distribute` is set, Istio
  only runs applyLocalityWeights and returns. If no `from` matches the client,
  that function changes nothing and failover is *not* applied either, so every
  group stays at priority 0 with its default weight (we do the same).
- Groups that no `to` pattern claims get their endpoints removed (no Placement).
- A 0% `to` entry leaves the group's default weight in Istio (it only sets a
  weight when the computed one is > 0); Istio's validator rejects 0, so does ours.
- failoverPriority alone replaces the locality order; combined with failover
  rules, Istio computes `failoverPriority * 5 + locality priority` (locality
  priorities span 0..4), then compacts.
- Istio's label match compares `proxyLabels[k] != endpointLabels[k]`, so a label
  missing on both sides "matches". Here a missing (or unknown topology) value
  never matches: two unknowns are not evidence of nearness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshplane.discovery import model
from meshplane.policy import routing, rules

# Istio's locality priorities span 0..4 (4 = a region a failover rule did not name),
# so failoverPriority levels are spaced by 5 to keep both orders when combined.
_LOCALITY_LEVELS = 5


@dataclass(frozen=True, slots=True)
class Placement:
    """One Envoy LocalityLbEndpoints: a locality's endpoints at one priority."""

    locality: model.Locality
    priority: int  # 0 = most preferred; compacted, no gaps
    weight: int  # LocalityLbEndpoints.load_balancing_weight, always >= 1
    endpoints: tuple[model.Endpoint, ...]
    reason: str = ""  # which rule put this group at this priority (`meshplane explain`); not sent


def place(
    endpoints: Sequence[model.Endpoint],
    *,
    client: model.Locality,
    client_labels: Mapping[str, str],
    settings: rules.LocalitySettings,
) -> tuple[Placement, ...]:
    """Group `endpoints` by locality and rank them for a client, sorted by (priority, locality).

    Health never changes a priority: Envoy's own priority/health logic (and the
    outlier detection the translator configures) moves traffic away from
    unhealthy endpoints, so they are placed like the others.
    """
    groups = _group(endpoints)
    # A client that did not tell its locality gets no ordering at all. Istio would
    # rank against an empty locality, which prefers endpoints whose locality is
    # unknown too (a coincidence, not proximity), and only a `from: "*"` distribute
    # rule could match it. Spreading over every endpoint by default weights is the
    # answer that cannot strand such a client's traffic in the wrong place.
    if not settings.enabled:
        return _placements((0, loc, eps, "locality load balancing is off: every locality alike")
                           for loc, eps in groups.items())
    if not client.known:
        return _placements((0, loc, eps, "the client's locality is unknown: every locality alike")
                           for loc, eps in groups.items())
    if settings.distribute:
        return _distribute(groups, client, settings.distribute)

    ranked: list[_Ranked] = []
    for loc, eps in groups.items():
        if not settings.failover_priority:
            level = _locality_priority(client, loc, settings.failover)
            ranked.append((level, loc, eps, _locality_reason(level, client, settings.failover)))
            continue
        # Endpoints of one locality may land at different priorities (by pod label).
        by_level: dict[int, list[model.Endpoint]] = {}
        for ep in eps:
            level = _label_priority(ep, client, client_labels, settings.failover_priority)
            by_level.setdefault(level, []).append(ep)
        near = _locality_priority(client, loc, settings.failover) if settings.failover else 0
        for level, members in by_level.items():
            matched = settings.failover_priority[:len(settings.failover_priority) - level]
            reason = ("failoverPriority: matches the client on " + ", ".join(matched) if matched
                      else "failoverPriority: matches the client on none of " + ", ".join(settings.failover_priority))
            if settings.failover:
                reason += "; then " + _locality_reason(near, client, settings.failover)
            ranked.append((level * _LOCALITY_LEVELS + near, loc, tuple(members), reason))
    return _placements(ranked)


_Ranked = tuple[int, model.Locality, tuple[model.Endpoint, ...], str]


def _locality_reason(level: int, client: model.Locality, failover: Sequence[rules.FailoverRule]) -> str:
    if level == 0:
        return "same region, zone and cluster"
    if level == 1:
        return "same region and zone, another cluster"
    if level == 2:
        return "same region, another zone"
    rule = next((r for r in failover if r.from_region == client.region), None)
    if rule is not None and level == 3:
        return f"failover rule: {rule.from_region} fails over to {rule.to_region}"
    return "another region"


def place_backend(
    endpoints: Sequence[model.Endpoint],
    backend: routing.Backend,
    *,
    client: model.Locality,
    client_labels: Mapping[str, str],
    settings: rules.LocalitySettings,
    spread: routing.Spread,
) -> tuple[Placement, ...]:
    """Where a route backend's requests go, for one client: the endpoints it selects, ranked.

    `backend.clusters` of two or more is an active-standby order: cluster i at priority i,
    whatever the client's locality. Otherwise the backend's `spread` (or the proxy kind's,
    `spread`) decides: every endpoint at one priority (so Envoy balances by endpoint count), or
    nearest first as `place` ranks them.
    """
    chosen = [ep for ep in endpoints if selects(backend, ep)]
    if backend.standby:
        order = {cluster: i for i, cluster in enumerate(backend.clusters)}
        groups = _group(chosen)
        return _placements((order[loc.cluster], loc, eps, f"active-standby: {loc.cluster} is "
                            f"#{order[loc.cluster] + 1} of {', '.join(backend.clusters)}")
                           for loc, eps in groups.items())
    if (backend.spread or spread) == routing.Spread.NEAREST:
        return place(chosen, client=client, client_labels=client_labels, settings=settings)
    return _placements((0, loc, eps, "spread: every endpoint alike") for loc, eps in _group(chosen).items())


def selects(backend: routing.Backend, ep: model.Endpoint) -> bool:
    """Whether an endpoint is one of a backend's: in its clusters, with its labels (topology labels
    read the endpoint's locality)."""
    if backend.clusters and ep.locality.cluster not in backend.clusters:
        return False
    labels = ep.label_map
    return all(_label_value(key, ep.locality, labels) == value for key, value in backend.labels)


def _group(endpoints: Iterable[model.Endpoint]) -> dict[model.Locality, tuple[model.Endpoint, ...]]:
    """Endpoints by locality, both in a deterministic order whatever the input order."""
    groups: dict[model.Locality, list[model.Endpoint]] = {}
    for ep in endpoints:
        groups.setdefault(ep.locality, []).append(ep)
    return {loc: tuple(sorted(groups[loc], key=_endpoint_order)) for loc in sorted(groups)}


_EndpointOrder = tuple[str, tuple[tuple[str, int], ...], tuple[tuple[str, str], ...], str, int]


def _endpoint_order(ep: model.Endpoint) -> _EndpointOrder:
    # Address and ports identify an endpoint; the rest only breaks ties between
    # duplicates, so that even they cannot make the output depend on input order.
    return (ep.address, ep.ports, ep.labels, ep.health.value, ep.weight)


def _weight(eps: Iterable[model.Endpoint]) -> int:
    # Envoy rejects a locality weight of 0 (and Istio sums endpoint weights).
    return max(1, sum(ep.weight for ep in eps))


def _placements(ranked: Iterable[_Ranked]) -> tuple[Placement, ...]:
    """Compact raw priorities to 0..N without gaps (Envoy requires it) and sort."""
    items = list(ranked)
    rank = {raw: i for i, raw in enumerate(sorted({raw for raw, _, _, _ in items}))}
    out = [
        Placement(locality=loc, priority=rank[raw], weight=_weight(eps), endpoints=eps, reason=reason)
        for raw, loc, eps, reason in items
    ]
    return tuple(sorted(out, key=lambda p: (p.priority, p.locality)))


def _locality_priority(
    client: model.Locality, loc: model.Locality, failover: Sequence[rules.FailoverRule]
) -> int:
    """Istio's LbPriority, plus its failover rules: 4 for regions the client's rule did not name."""
    if loc.region == client.region:
        if loc.zone != client.zone:
            return 2
        return 0 if loc.cluster == client.cluster else 1
    for rule in failover:
        if rule.from_region == client.region:  # the first rule for this region only
            return 3 if loc.region == rule.to_region else 4
    return 3


def _label_priority(
    ep: model.Endpoint,
    client: model.Locality,
    client_labels: Mapping[str, str],
    labels: Sequence[str],
) -> int:
    """len(labels) minus how many leading labels the endpoint shares with the client."""
    endpoint_labels = ep.label_map
    for i, entry in enumerate(labels):
        key, has_override, override = entry.partition("=")
        want = override if has_override else _label_value(key, client, client_labels)
        have = _label_value(key, ep.locality, endpoint_labels)
        if want is None or have is None or want != have:
            return len(labels) - i
    return 0


def _label_value(key: str, loc: model.Locality, labels: Mapping[str, str]) -> str | None:
    """A label's value, topology labels read from the locality; None when missing or unknown."""
    if key in rules.TOPOLOGY_LABELS:
        if key == rules.REGION_LABEL:
            value = loc.region
        elif key == rules.ZONE_LABEL:
            value = loc.zone
        else:  # Envoy's sub_zone carries the Kubernetes cluster here, so both labels read it
            value = loc.cluster
        return value or None
    return labels.get(key)


def _distribute(
    groups: Mapping[model.Locality, tuple[model.Endpoint, ...]],
    client: model.Locality,
    distribute_rules: Sequence[rules.DistributeRule],
) -> tuple[Placement, ...]:
    """Istio's applyLocalityWeights: the first rule whose `from` matches the client applies."""
    rule = next((r for r in distribute_rules if _locality_matches(r.from_locality, client)), None)
    if rule is None:
        # Istio returns after the distribute branch: no failover, no reordering.
        return _placements((0, loc, eps, "no distribute rule matches the client: every locality alike")
                           for loc, eps in groups.items())
    unclaimed = dict(groups)
    out: list[Placement] = []
    for pattern, percent in rule.to:  # the operator's order: the first pattern claims a group
        matched = [loc for loc in unclaimed if _locality_matches(pattern, loc)]
        total = sum(_weight(unclaimed[loc]) for loc in matched)
        for loc in matched:
            eps = unclaimed.pop(loc)
            # A wildcard matching several groups splits its share by their own weights;
            # rounding up (integer ceil, as Istio's float ceil) keeps every share >= 1.
            weight = -(-percent * _weight(eps) // total)
            out.append(Placement(loc, 0, weight if weight > 0 else _weight(eps), eps,
                                 f"distribute rule from {rule.from_locality}: {pattern} gets {percent}%"))
    # Groups left unclaimed get no traffic: Istio empties them, we leave them out.
    return tuple(sorted(out, key=lambda p: (p.priority, p.locality)))


def _locality_matches(pattern: str, loc: model.Locality) -> bool:
    """Istio's LocalityMatch: `region/zone/cluster`; `*` or a missing segment matches anything."""
    region, zone, cluster = [*pattern.split("/"), "", ""][:3]
    return (
        (region == "*" or region == loc.region)
        and (zone in ("", "*") or zone == loc.zone)
        and (cluster in ("", "*") or cluster == loc.cluster)
    )
