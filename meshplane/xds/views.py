"""The view cache: what each kind of proxy receives, built once per view.

A proxy's resources are a pure function of its view key (role, locality,
the listener it asked for, and the few client labels policy reads) plus the
catalog and the policy. Streams that share a view key share one View and
the very same encoded resources. Within views, pieces are shared further:
clusters are the same for every view, route configs per namespace,
endpoint assignments per (locality, labels). A change to one service
rebuilds that service's pieces only, for the live views only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshplane.discovery import model
from meshplane.policy import locality as locality_mod
from meshplane.policy import types as policy_types
from meshplane.xds import resources, translate, types

Resources = dict[str, resources.Resource]


@dataclass(frozen=True, slots=True)
class ViewKey:
    role: str
    locality: model.Locality
    namespace: str = "default"
    listener_address: str = "0.0.0.0"
    listener_port: int = 15001
    labels: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in self.labels)
        return f"{self.role}@{self.locality}/{self.namespace}:{self.listener_port}[{labels}]"


@dataclass(slots=True)
class View:
    key: ViewKey
    resources: dict[str, Resources] = field(default_factory=dict)
    previous: dict[str, Resources] = field(default_factory=dict)  # resources before the last build
    streams: int = 0
    _versions: dict[str, str] = field(default_factory=dict)

    def version(self, type_url: str) -> str:
        """The version_info of this view's whole set of `type_url` resources (hashed once per change)."""
        version = self._versions.get(type_url)
        if version is None:
            version = self._versions[type_url] = resources.type_version(self.resources.get(type_url, {}).values())
        return version


Changes = dict[str, set[str]]
"""type URL -> names of the resources of that type that changed (added, updated or removed)."""


_LocalityKey = tuple[model.Locality, tuple[tuple[str, str], ...]]


class ViewCache:
    """Builds and keeps the resources of every live view."""

    def __init__(
        self, *, services: Mapping[model.ServiceKey, model.Service], policy: policy_types.Policy
    ) -> None:
        self._services = services
        self._policy = policy
        self._views: dict[ViewKey, View] = {}
        self._clusters_by_service: dict[model.ServiceKey, Resources] = {}
        self._clusters: Resources = {}
        self._routes: dict[str, resources.Resource] = {}
        self._listeners: dict[tuple[str, int, str], resources.Resource] = {}
        self._assignments: dict[model.ServiceKey, dict[_LocalityKey, Resources]] = {}
        for key in services:
            self._clusters_by_service[key] = self._build_clusters(key, seen_at=None)
        self._clusters = self._merge_clusters()

    @property
    def policy(self) -> policy_types.Policy:
        return self._policy

    @property
    def views(self) -> Mapping[ViewKey, View]:
        return self._views

    def view_key(
        self, *, role: str, locality: model.Locality, namespace: str, listener_address: str,
        listener_port: int, labels: Mapping[str, str],
    ) -> ViewKey:
        wanted = self._policy.client_label_keys()
        return ViewKey(
            role=role,
            locality=locality,
            namespace=namespace,
            listener_address=listener_address,
            listener_port=listener_port,
            labels=tuple(sorted((k, v) for k, v in labels.items() if k in wanted)),
        )

    def acquire(self, key: ViewKey) -> View:
        view = self._views.get(key)
        if view is None:
            view = View(key=key)
            self._build_view(view, seen_at=None)
            self._views[key] = view
        view.streams += 1
        return view

    def release(self, key: ViewKey) -> None:
        view = self._views.get(key)
        if view is None:
            return
        view.streams -= 1
        if view.streams <= 0:
            del self._views[key]

    def update(
        self,
        *,
        services: Mapping[model.ServiceKey, model.Service],
        policy: policy_types.Policy,
        changed: frozenset[model.ServiceKey],
        seen_at: float,
    ) -> dict[ViewKey, Changes]:
        """Rebuild what `changed` services (or a new policy) touch; return what changed, per view."""
        old_policy, old_services = self._policy, self._services
        self._services = services
        self._policy = policy
        # Endpoint assignments depend on a service's endpoints and its locality settings alone: a policy
        # change that leaves those alone (outlier detection, timeouts) rebuilds clusters, not assignments.
        stale_assignments = changed
        if policy != old_policy:
            changed = frozenset(old_services.keys() | services.keys())
            stale_assignments = stale_assignments | {
                k for k in changed if old_policy.for_service(k).locality != policy.for_service(k).locality}

        cds_changes: set[str] = set()
        old_names: dict[model.ServiceKey, set[str]] = {}
        for key in changed:
            if key in stale_assignments:
                self._assignments.pop(key, None)
            old = self._clusters_by_service.pop(key, {})
            old_names[key] = set(old)
            new = self._build_clusters(key, seen_at=seen_at) if key in services else {}
            new = {name: old[name] if name in old and old[name].version == r.version else r for name, r in new.items()}
            if new:
                self._clusters_by_service[key] = new
            cds_changes |= {n for n in old.keys() | new.keys() if old.get(n) is not new.get(n)}
        if cds_changes:
            self._clusters = self._merge_clusters()
        if any(_shape(old_services.get(k)) != _shape(services.get(k)) for k in changed):
            self._routes.clear()

        # The only EDS entries that can differ: those of the changed services, before and after.
        eds_candidates = set().union(*old_names.values(), *(self._clusters_by_service.get(k, {}) for k in changed))
        result: dict[ViewKey, Changes] = {}
        for view in self._views.values():
            before = view.resources
            self._build_view(view, seen_at=seen_at, changed=old_names)
            changes: Changes = {}
            if cds_changes:
                changes[types.CLUSTER] = cds_changes
            for type_url in (types.ENDPOINT, types.LISTENER, types.ROUTE):
                old_set, new_set = before.get(type_url, {}), view.resources[type_url]
                candidates = eds_candidates if type_url == types.ENDPOINT else old_set.keys() | new_set.keys()
                names = {n for n in candidates if old_set.get(n) is not new_set.get(n)}
                if names:
                    changes[type_url] = names
            if changes:
                result[view.key] = changes
        return result

    # building

    def _build_view(
        self, view: View, *, seen_at: float | None,
        changed: Mapping[model.ServiceKey, set[str]] | None = None,
    ) -> None:
        """(Re)build a view; with `changed` (service -> its cluster names before), only those services."""
        key = view.key
        route_name = translate.route_config_name(key.namespace)
        route = self._routes.get(key.namespace)
        if route is None:
            msg = translate.build_route_config(key.namespace, self._services.values())
            route = resources.build(route_name, msg, type_url=types.ROUTE, seen_at=seen_at)
            self._routes[key.namespace] = route
        old_route = view.resources.get(types.ROUTE, {}).get(route_name)
        if old_route is not None and old_route.version == route.version:
            route = old_route
        listener = self._listener(key, route_name)

        old_eds = view.resources.get(types.ENDPOINT)
        if old_eds is None or changed is None:
            eds: Resources = {}
            for service_key in self._services:
                eds.update(self._assignments_for(service_key, key, seen_at))
        else:
            eds = dict(old_eds)  # a C-speed copy; then only the changed services' entries are touched
            for service_key, names in changed.items():
                for name in names:
                    eds.pop(name, None)
                if service_key in self._services:
                    for name, r in self._assignments_for(service_key, key, seen_at).items():
                        previous = old_eds.get(name)
                        eds[name] = previous if previous is not None and previous.version == r.version else r
        view._versions = {}
        view.previous = view.resources
        view.resources = {
            types.CLUSTER: self._clusters,
            types.ENDPOINT: eds,
            types.LISTENER: {listener.name: listener},
            types.ROUTE: {route.name: route},
        }

    def _listener(self, key: ViewKey, route_name: str) -> resources.Resource:
        memo = (key.listener_address, key.listener_port, key.namespace)
        listener = self._listeners.get(memo)
        if listener is None:
            msg = translate.build_listener(
                name="outbound_http", address=key.listener_address, port=key.listener_port, route_name=route_name
            )
            listener = resources.build("outbound_http", msg, type_url=types.LISTENER, seen_at=None)
            self._listeners[memo] = listener
        return listener

    def _build_clusters(self, key: model.ServiceKey, *, seen_at: float | None) -> Resources:
        service = self._services[key]
        sp = self._policy.for_service(key)
        out: Resources = {}
        for port in service.ports:
            if port.protocol == model.Protocol.TCP:
                continue
            msg = translate.build_cluster(service, port, sp)
            out[msg.name] = resources.build(msg.name, msg, type_url=types.CLUSTER, seen_at=seen_at)
        return out

    def _merge_clusters(self) -> Resources:
        merged: Resources = {}
        for per_service in self._clusters_by_service.values():
            merged.update(per_service)
        return merged

    def _assignments_for(self, service_key: model.ServiceKey, key: ViewKey, seen_at: float | None) -> Resources:
        memo = self._assignments.setdefault(service_key, {})
        locality_key = (key.locality, key.labels)
        built = memo.get(locality_key)
        if built is None:
            service = self._services[service_key]
            placements = locality_mod.place(
                service.endpoints,
                client=key.locality,
                client_labels=dict(key.labels),
                settings=self._policy.for_service(service_key).locality,
            )
            built = {}
            for port in service.ports:
                if port.protocol == model.Protocol.TCP:
                    continue
                name = translate.cluster_name(service, port)
                msg = translate.build_load_assignment(name, port.name, placements)
                built[name] = resources.build(name, msg, type_url=types.ENDPOINT, seen_at=seen_at)
            memo[locality_key] = built
        return built


def _shape(service: model.Service | None) -> object:
    """What route configs depend on: a service's identity and ports, not its endpoints."""
    return None if service is None else (service.name, service.namespace, service.ports)


