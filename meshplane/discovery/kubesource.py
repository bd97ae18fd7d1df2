"""KubeSource: one Kubernetes cluster's services and endpoints, kept in the catalog.

Reflectors (kube.py) keep compact stores of services, endpoint slices, nodes
and (optionally) pods, each in its own thread; their changes arrive here on
the event loop. This class turns them into `catalog.apply` calls, and its
rules are what docs/architecture.md, invariant 6 (never push emptiness out of
ignorance) asks:

- Nothing before every reflector has listed once: a cluster we have not
  listed yet is unknown, not empty.
- Nothing while a reflector is listing again (after 410 Gone, or after an
  outage) or cannot reach the API server: a re-list learns its deletions only
  at its end, and an unreachable server tells us nothing. When the list is
  complete, only what really changed is applied.
- Then only the services an event touched are recomputed (a slice -> its
  service; a service -> itself; a node -> services with endpoints on it; a pod
  -> services with that pod), into a dict of per-service values of which only
  those entries are replaced; the catalog diffs the whole mapping.
- Bursts coalesce: at most one apply per `_COALESCE` window.
- Slices without their Service are left out at once, and reported only once
  the watches have settled and it is still missing (orphans.py).

Stale policy: while the API server is unreachable the cluster is marked
stale in the catalog and its last known endpoints stay. With `stale_ttl` set,
they are dropped that many seconds after they became stale (and logged); by
default they are kept until the server answers again. The clock is the
catalog's, not this source's: when the cluster is reconnected (new
credentials) and the new source cannot list either, its endpoints go when
the stale TTL counted from the first outage says so, whether or not the new
source ever synced. On recovery the reflectors list again, the difference is
applied, and the stale mark goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from meshplane import aio
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import kube, kubemodel, model, orphans

log = structlog.get_logger(__name__)

_COALESCE = 0.005  # seconds: one apply for a burst of events (a rollout, a re-list)
ORPHANED = "endpoint slices without their service: left out"


@dataclass(frozen=True, kw_only=True)
class KubeOptions:
    default_region: str = ""  # for endpoints whose node has no region label (or is unknown)
    watch_pods: bool = True  # pod labels on endpoints (needs RBAC to list/watch pods)
    page_size: int = 500
    watch_timeout: float = 300.0
    backoff_initial: float = 0.5
    backoff_max: float = 4.0  # bounds recovery once the API server is back (docs/kubernetes.md)
    stale_ttl: float | None = None  # None: keep a lost cluster's endpoints forever; else drop them after this
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    connect_timeout: float = 5.0
    request_timeout: float = 30.0  # read timeout of a list; a watch may be silent watch_timeout longer
    bookmark_silence: float = 120.0  # ... or this long, once the server has shown periodic bookmarks
    orphan_grace: float = 10.0  # slices without their Service are reported only after this (orphans.py)

    def reflector_options(self) -> kube.ReflectorOptions:
        return kube.ReflectorOptions(
            page_size=self.page_size,
            watch_timeout=self.watch_timeout,
            connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            bookmark_silence=self.bookmark_silence,
        )


class KubeSource:
    """Feeds one Kubernetes cluster into the catalog, from its first complete list on.

    Runs one thread per reflector: services, endpointslices, nodes, pods (unless `watch_pods` is off),
    each per namespace when `namespaces` is set. The reflectors talk through a copy of `api_client`'s
    configuration (urllib3 retries off); the caller still owns `api_client` and closes it.
    """

    def __init__(self, cluster: model.ClusterId, api_client: kube.ApiClient, *,
                 options: KubeOptions = KubeOptions()) -> None:
        self.cluster = cluster
        self.options = options
        self.synced = False  # every reflector listed once and the first catalog.apply happened
        self.stale = False  # the API server is unreachable (error says why)
        self.error = ""
        self._api_client = api_client
        self._client: Any = None
        self._catalog: catalog_mod.Catalog | None = None
        self._problems = kubemodel.Problems(cluster=cluster)
        self._reflectors: list[kube.Reflector[Any]] = []
        self._by_resource: dict[str, dict[str, kube.Reflector[Any]]] = {}  # resource -> namespace -> reflector
        self._current: dict[model.ServiceKey, model.ServiceInCluster] = {}
        self._slices_of_service: dict[model.ServiceKey, str | set[str]] = {}
        self._slices_on_node: dict[str, str | set[str]] = {}
        self._slices_of_pod: dict[str, str | set[str]] = {}
        self._dirty: set[model.ServiceKey] = set()
        self._dirty_since: float | None = None
        self._must_apply = False  # clear the stale mark, or give back what stale_ttl removed
        self._removed = False
        self._unreachable: dict[str, str] = {}  # reflector name -> error
        self._flush_handle: asyncio.TimerHandle | None = None
        self._ttl_handle: asyncio.TimerHandle | None = None
        self._orphans = orphans.Orphans(grace=options.orphan_grace, backstop=options.bookmark_silence,
                                        cluster=cluster)
        self._orphan_handle: asyncio.TimerHandle | None = None
        self._synced_event = asyncio.Event()
        self._stopped = False

    @property
    def api_client(self) -> kube.ApiClient:
        return self._api_client

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, catalog: catalog_mod.Catalog) -> None:
        """Start the reflectors and return at once; `wait_synced` waits for the first apply."""
        self._catalog = catalog
        self._client = kube.private_client(self._api_client)
        reflector_options = self.options.reflector_options()
        kinds: list[tuple[str, Callable[..., Any], str | None]] = [
            ("services", kubemodel.service_record, None),
            ("endpointslices", functools.partial(kubemodel.slice_record, pods=self.options.watch_pods),
             kubemodel.SERVICE_NAME_LABEL),
            ("nodes", kubemodel.node_record, None),
        ]
        if self.options.watch_pods:
            kinds.append(("pods", kubemodel.pod_record, None))
        for resource, decode, selector in kinds:
            namespaces = ("",) if resource == "nodes" or not self.options.namespaces else self.options.namespaces
            for namespace in namespaces:
                reflector: kube.Reflector[Any] = kube.Reflector(
                    api_client=self._client, resource=resource, namespace=namespace, decode=decode, owner=self,
                    problems=self._problems, cluster=self.cluster,
                    options=dataclasses.replace(reflector_options, label_selector=selector),
                )
                self._reflectors.append(reflector)
                self._by_resource.setdefault(resource, {})[namespace] = reflector
        loop = asyncio.get_running_loop()
        for reflector in self._reflectors:
            reflector.start(loop)

    async def stop(self) -> None:
        self._stopped = True
        for handle in (self._flush_handle, self._ttl_handle, self._orphan_handle):
            if handle is not None:
                handle.cancel()
        for reflector in self._reflectors:
            reflector.stop()
        for reflector in self._reflectors:
            await reflector.join()
        if self._client is not None:
            self._client.close()
            self._client = None

    async def wait_synced(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._synced_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- reflector callbacks (loop thread) -----------------------------------------------

    def on_change(self, reflector: kube.Reflector[Any], key: str, old: Any, new: Any, seen_at: float) -> None:
        resource = reflector.resource
        affected: set[model.ServiceKey]
        if resource == "services":
            affected = {model.ServiceKey(key)}
        elif resource == "endpointslices":
            affected = set()
            if old is not None:
                self._index_slice(key, old, add=False)
                affected.add(old.service_key)
            if new is not None:
                self._index_slice(key, new, add=True)
                affected.add(new.service_key)
        elif resource == "nodes":
            affected = self._services_of(_members(self._slices_on_node, key))
        else:
            affected = self._services_of(_members(self._slices_of_pod, key))
        if self.synced and affected:
            self._dirty |= affected
            self._dirty_since = seen_at if self._dirty_since is None else min(self._dirty_since, seen_at)
            self._schedule()

    def on_listed(self, reflector: kube.Reflector[Any], seen_at: float) -> None:
        if self.synced:
            self._schedule()
            return
        if all(r.synced for r in self._reflectors):
            self._first_apply(seen_at)

    def on_reachable(self, reflector: kube.Reflector[Any], reachable: bool, error: str) -> None:
        if not reachable:
            self._unreachable[reflector.name] = error
            if not self.stale:
                self.stale, self.error = True, error
                self._lost()
            return
        self._unreachable.pop(reflector.name, None)
        if self.stale and not self._unreachable:
            self.stale, self.error = False, ""
            if self._ttl_handle is not None:
                self._ttl_handle.cancel()
                self._ttl_handle = None
            log.info("kubernetes API server reachable again", cluster=self.cluster)
            self._must_apply = True
            self._schedule()

    # --- applying ------------------------------------------------------------------------

    def _first_apply(self, seen_at: float) -> None:
        assert self._catalog is not None
        keys = set(self._slices_of_service)
        for reflector in self._by_resource["services"].values():
            keys.update(model.ServiceKey(k) for k in reflector.store)
        for key in keys:
            self._recompute(key)
        self._catalog.apply(self.cluster, self._current, seen_at=seen_at)
        if self._removed:
            log.info("restoring endpoints dropped after stale_ttl", cluster=self.cluster)
            self._removed = False
        self.synced = True
        self._synced_event.set()
        if self.stale:  # the lists got through, but something has failed since: stale from now
            if self._ttl_handle is not None:
                self._ttl_handle.cancel()
                self._ttl_handle = None
            self._lost()
        log.info("kubernetes cluster synced", cluster=self.cluster, services=len(self._current),
                 endpoints=sum(len(s.endpoints) for s in self._current.values()))

    def _schedule(self) -> None:
        if self._flush_handle is None and not self._stopped:
            self._flush_handle = asyncio.get_running_loop().call_later(_COALESCE, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._stopped or not self.synced or self._unreachable or any(r.listing for r in self._reflectors):
            return  # the re-list (or the recovery) that holds us back schedules a flush when it ends
        if not self._dirty and not self._must_apply:
            return
        assert self._catalog is not None
        keys, self._dirty = self._dirty, set()
        seen_at = self._dirty_since if self._dirty_since is not None else time.monotonic()
        self._dirty_since = None
        for key in keys:
            self._recompute(key)
        whole = self._must_apply or self._removed
        if self._removed:
            log.info("restoring endpoints dropped after stale_ttl", cluster=self.cluster)
            self._removed = False
        if whole:  # back from stale (or from stale_ttl's removal): all of it, compared
            self._must_apply = False
            self._catalog.apply(self.cluster, self._current, seen_at=seen_at)
            return
        # Only the services events touched are compared (Catalog.update), not the whole cluster.
        self._catalog.update(self.cluster, {k: self._current[k] for k in keys if k in self._current},
                             [k for k in keys if k not in self._current], seen_at=seen_at)

    def _lost(self) -> None:
        if self._catalog is None or self._stopped:
            return
        self._catalog.mark_stale(self.cluster, self.error)
        ttl = self.options.stale_ttl
        since = self._catalog.status()[self.cluster].stale_since
        if ttl is not None and since is not None and not self._removed and self._ttl_handle is None:
            delay = max(0.0, since + ttl - time.monotonic())
            self._ttl_handle = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._ttl_handle = None
        if self._stopped or not self.stale or self._catalog is None:
            return
        status = self._catalog.status().get(self.cluster)
        if status is None or not status.services:
            return  # nothing known of the cluster (it never listed): nothing to drop
        log.warning("kubernetes API server unreachable past stale_ttl: dropping the cluster's endpoints",
                    cluster=self.cluster, stale_ttl=self.options.stale_ttl, error=self.error,
                    services=len(status.services))
        self._removed = True
        self._catalog.remove_cluster(self.cluster, seen_at=time.monotonic())

    # --- slices without their service (orphans.py) --------------------------------------

    def _watch_orphans(self) -> None:
        if self._orphan_handle is None and not self._stopped:
            delay = self._orphans.next_check(time.monotonic())
            if delay is not None:
                self._orphan_handle = asyncio.get_running_loop().call_later(delay, self._judge_orphans)

    def _judge_orphans(self) -> None:
        self._orphan_handle = None
        if self._stopped:
            return
        try:
            if not self._unreachable and not any(r.listing for r in self._reflectors):  # else: not settled yet
                for key, age in self._orphans.due(time.monotonic(), self._services_caught_up):
                    self._problems.report(ORPHANED, f"Service {key}", slices=len(tuple(
                        _members(self._slices_of_service, key))), for_seconds=round(age, 1))
        except Exception:  # our bug: the later orphans must still be judged
            aio.failed("kube-orphans", "judging endpoint slices without their service failed; trying again",
                       cluster=self.cluster)
        finally:
            self._watch_orphans()

    def _services_caught_up(self, key: model.ServiceKey, version: str) -> bool | None:
        reflector = self._reflector("services", key)
        return None if reflector is None else kubemodel.version_at_least(reflector.version, version)

    def _not_orphaned(self, key: model.ServiceKey, *, found: bool) -> None:
        if self._orphans.resolve(key):  # it was reported: say that it is over, and report it again if it recurs
            self._problems.forget(f"Service {key}", ORPHANED)
            if found:
                log.info("endpoint slices have their service now", object=f"Service {key}", cluster=self.cluster)

    # --- computing -----------------------------------------------------------------------

    def _recompute(self, key: model.ServiceKey) -> None:
        value = self._compute(key)
        if value is None:
            self._current.pop(key, None)
        else:
            self._current[key] = value

    def _compute(self, key: model.ServiceKey) -> model.ServiceInCluster | None:
        service = self._lookup("services", key)
        slice_keys = tuple(_members(self._slices_of_service, key))
        if service is None:
            if slice_keys:  # no ports, nothing to route; its Service may be late, or gone for good (orphans.py)
                watch = self._reflector("endpointslices", key)
                self._orphans.note(key, now=time.monotonic(), after=watch.version if watch is not None else "")
                self._watch_orphans()
            else:
                self._not_orphaned(key, found=False)
            return None
        self._not_orphaned(key, found=True)
        slices = [s for k in sorted(slice_keys) if (s := self._lookup("endpointslices", k)) is not None]
        return kubemodel.service_in_cluster(
            service, slices, cluster=self.cluster, default_region=self.options.default_region,
            nodes=self._node, pods=self._pod if self.options.watch_pods else None, problems=self._problems,
        )

    def _lookup(self, resource: str, key: str) -> Any:
        reflector = self._reflector(resource, key)
        return reflector.store.get(key) if reflector is not None else None

    def _reflector(self, resource: str, key: str) -> kube.Reflector[Any] | None:
        by_namespace = self._by_resource.get(resource, {})
        return by_namespace.get("") or by_namespace.get(key.partition("/")[0])

    def _node(self, name: str) -> kubemodel.NodeRecord | None:
        node: kubemodel.NodeRecord | None = self._lookup("nodes", name)
        return node

    def _pod(self, key: str) -> kubemodel.PodRecord | None:
        pod: kubemodel.PodRecord | None = self._lookup("pods", key)
        return pod

    def _index_slice(self, key: str, sl: kubemodel.SliceRecord, *, add: bool) -> None:
        _index(self._slices_of_service, (sl.service_key,), key, add=add)
        _index(self._slices_on_node, {ep.node for ep in sl.endpoints if ep.node}, key, add=add)
        if self.options.watch_pods:
            _index(self._slices_of_pod, {ep.pod for ep in sl.endpoints if ep.pod}, key, add=add)

    def _services_of(self, slice_keys: Iterable[str]) -> set[model.ServiceKey]:
        services = set()
        for k in slice_keys:
            sl = self._lookup("endpointslices", k)
            if sl is not None:
                services.add(sl.service_key)
        return services


def _index(index: dict[Any, str | set[str]], keys: Iterable[Any], member: str, *, add: bool) -> None:
    """A reverse index; one member is held as itself, not in a set (a pod is in one slice: 50,000 sets saved)."""
    for k in keys:
        members = index.get(k)
        if add:
            if members is None:
                index[k] = member
            elif isinstance(members, str):
                if members != member:
                    index[k] = {members, member}
            else:
                members.add(member)
        elif members is not None:
            if isinstance(members, str):
                if members == member:
                    del index[k]
            else:
                members.discard(member)
                if len(members) == 1:
                    index[k] = next(iter(members))


def _members(index: dict[Any, str | set[str]], key: Any) -> Iterable[str]:
    members = index.get(key)
    if members is None:
        return ()
    return (members,) if isinstance(members, str) else members
