"""The catalog: every cluster's services merged into one immutable snapshot.

Sources (one per cluster) hand the catalog their whole view of a cluster
(`apply`), or the services of it they know changed (`update`, which compares
only those); the catalog works out which services really changed and tells its
subscribers "services X, Y changed, first seen at t". Nothing downstream
ever diffs endpoints again: a service whose merged value is equal to the
last one is not reported.

A cluster that has never synced contributes nothing; a cluster that lost
its source keeps its last endpoints (marked stale) until the source says
otherwise, so nothing is pushed empty out of ignorance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from meshplane.discovery import model

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Change:
    """Services whose merged value changed, and when a source first saw the change."""

    services: frozenset[model.ServiceKey]
    seen_at: float


@dataclass(slots=True)
class ClusterStatus:
    synced: bool = False
    stale: bool = False
    error: str = ""
    stale_since: float | None = None  # monotonic time the endpoints became stale, across sources of the cluster
    services: dict[model.ServiceKey, model.ServiceInCluster] = field(default_factory=dict)


Subscriber = Callable[[Change], None]


class Catalog:
    """Merges per-cluster service sets; holds the current snapshot, reports changes."""

    def __init__(self, clusters: Iterable[model.ClusterId] = ()) -> None:
        self._clusters: dict[model.ClusterId, ClusterStatus] = {c: ClusterStatus() for c in clusters}
        self._services: dict[model.ServiceKey, model.Service] = {}
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    @property
    def services(self) -> Mapping[model.ServiceKey, model.Service]:
        """The current snapshot. Callers must not mutate it; apply() replaces it."""
        return self._services

    def status(self) -> Mapping[model.ClusterId, ClusterStatus]:
        return self._clusters

    def ready(self) -> bool:
        return all(s.synced for s in self._clusters.values())

    def expect(self, cluster: model.ClusterId) -> None:
        """Know of a cluster before its source has listed (status shows it unsynced)."""
        self._clusters.setdefault(cluster, ClusterStatus())

    def apply(
        self,
        cluster: model.ClusterId,
        services: Mapping[model.ServiceKey, model.ServiceInCluster],
        *,
        seen_at: float,
    ) -> Change | None:
        """Replace everything `cluster` knows; return (and publish) what changed, if anything."""
        status = self._clusters.setdefault(cluster, ClusterStatus())
        old = status.services
        status.services = dict(services)
        status.synced = True
        status.stale = False
        status.error = ""
        status.stale_since = None
        touched = {k for k in old.keys() | services.keys() if old.get(k) != services.get(k)}
        return self._merge(touched, seen_at)

    def update(
        self,
        cluster: model.ClusterId,
        changed: Mapping[model.ServiceKey, model.ServiceInCluster],
        removed: Iterable[model.ServiceKey] = (),
        *,
        seen_at: float,
    ) -> Change | None:
        """What a source says changed of `cluster` (the rest stays as it was): only those services are
        compared, so an edit costs what it touches, not the size of the cluster."""
        status = self._clusters.setdefault(cluster, ClusterStatus())
        services = status.services
        touched: set[model.ServiceKey] = set()
        for key, service in changed.items():
            if services.get(key) != service:
                services[key] = service
                touched.add(key)
        for key in removed:
            if services.pop(key, None) is not None:
                touched.add(key)
        status.synced = True
        status.stale = False
        status.error = ""
        status.stale_since = None
        return self._merge(touched, seen_at)

    def remove_cluster(self, cluster: model.ClusterId, *, seen_at: float) -> Change | None:
        status = self._clusters.pop(cluster, None)
        if status is None:
            return None
        return self._merge(set(status.services), seen_at)

    def mark_stale(self, cluster: model.ClusterId, error: str) -> None:
        """The source lost its cluster: keep the endpoints, say they may be out of date.

        Staleness is the cluster's, not the source's: a source that replaces another (new credentials)
        and cannot list either keeps the time the endpoints became stale, which a stale TTL counts from.
        """
        status = self._clusters.setdefault(cluster, ClusterStatus())
        if not status.stale or status.error != error:
            log.warning("cluster stale, keeping last known endpoints", cluster=cluster, error=error)
        if not status.stale:
            status.stale_since = time.monotonic()
        status.stale = True
        status.error = error

    def _merge(self, touched: set[model.ServiceKey], seen_at: float) -> Change | None:
        if not touched:
            return None
        services = dict(self._services)
        changed: set[model.ServiceKey] = set()
        for key in touched:
            merged = self._merged(key)
            if merged != services.get(key):
                changed.add(key)
                if merged is None:
                    del services[key]
                else:
                    services[key] = merged
        if not changed:
            return None
        self._services = services
        change = Change(services=frozenset(changed), seen_at=seen_at)
        for subscriber in self._subscribers:
            subscriber(change)
        return change

    def _merged(self, key: model.ServiceKey) -> model.Service | None:
        parts = [
            (cluster, status.services[key])
            for cluster, status in sorted(self._clusters.items())
            if key in status.services
        ]
        if not parts:
            return None
        first = parts[0][1]
        endpoints = sorted((ep for _, part in parts for ep in part.endpoints), key=_endpoint_order)
        return model.Service(
            name=first.name,
            namespace=first.namespace,
            ports=first.ports,
            endpoints=tuple(endpoints),
            clusters=tuple(cluster for cluster, _ in parts),
        )


def _endpoint_order(ep: model.Endpoint) -> tuple[object, ...]:
    return (ep.locality, ep.address, ep.ports, ep.labels, ep.health.value, ep.weight)
