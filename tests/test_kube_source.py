"""KubeSource end to end: the real `kubernetes` client against the wire-protocol fake API server.

Each test breaks the API server in one way and checks what the catalog saw, change by change:
the invariant under test is "never push emptiness out of ignorance".
"""

from __future__ import annotations

import asyncio
import http.server
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import kubernetes
import pytest
import structlog

from meshplane import aio
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import kube, kubemodel, kubesource, model, orphans
from tests.conftest import wait_for
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, pod, service

C1 = model.ClusterId("c1")
WEB, API = model.service_key("shop", "web"), model.service_key("shop", "api")
FAST = {"watch_timeout": 5.0, "backoff_initial": 0.05, "backoff_max": 0.2, "request_timeout": 2.0,
        "default_region": "eu"}
HTTP = [{"name": "http", "port": 80}]

StartSource = Callable[..., Awaitable[kubesource.KubeSource]]


class Recorder:
    """Every Change the catalog publishes, with the snapshot right after it."""

    def __init__(self, catalog: catalog_mod.Catalog) -> None:
        self.catalog = catalog
        self.seen: list[tuple[catalog_mod.Change, Mapping[model.ServiceKey, model.Service]]] = []
        catalog.subscribe(self)

    def __call__(self, change: catalog_mod.Change) -> None:
        self.seen.append((change, self.catalog.services))

    def since(self, n: int) -> list[tuple[catalog_mod.Change, Mapping[model.ServiceKey, model.Service]]]:
        return self.seen[n:]


def addresses(catalog: catalog_mod.Catalog, key: model.ServiceKey) -> dict[str, model.Health] | None:
    svc = catalog.services.get(key)
    return None if svc is None else {e.address: e.health for e in svc.endpoints}


def web_slice(*eps: dict[str, Any], name: str = "web-a") -> dict[str, Any]:
    return endpoint_slice(name, "shop", "web", list(eps), ports=[{"name": "http", "port": 8080}])


def populate(fake: FakeKubeAPI) -> None:
    fake.put("nodes", node("n1", "eu", "eu-a"))
    fake.put("nodes", node("n2", "us", "us-b"))
    fake.put("pods", pod("web-1", "shop", {"app": "web", "version": "v1"}))
    fake.put("pods", pod("web-2", "shop", {"app": "web", "version": "v2"}))
    fake.put("services", service("web", "shop", ports=HTTP))
    fake.put("services", service("api", "shop", ports=[{"name": "grpc", "port": 9090}]))
    fake.put("endpointslices", web_slice(
        endpoint("10.0.0.1", node_name="n1", pod="web-1", ns="shop"),
        endpoint("10.0.0.2", node_name="n2", pod="web-2", ns="shop"),
    ))
    fake.put("endpointslices", web_slice(endpoint("10.0.0.3", node_name="n-unknown", zone="eu-c"), name="web-b"))
    fake.put("endpointslices", endpoint_slice("api-a", "shop", "api", [endpoint("10.0.1.1", node_name="n1")],
                                              ports=[{"name": "grpc", "port": 9091}]))


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI("c1") as api:
        yield api


@pytest.fixture
async def start_source(fake: FakeKubeAPI) -> AsyncIterator[StartSource]:
    started: list[tuple[kubesource.KubeSource, Any]] = []

    async def start(catalog: catalog_mod.Catalog, **options: Any) -> kubesource.KubeSource:
        api = kubernetes.config.new_client_from_config_dict(fake.kubeconfig(cluster="c1"))
        source = kubesource.KubeSource(C1, api, options=kubesource.KubeOptions(**{**FAST, **options}))
        await source.start(catalog)
        started.append((source, api))
        return source

    yield start
    for source, api in started:
        began = time.monotonic()
        await source.stop()
        assert time.monotonic() - began < 1.0, "stop() must be prompt"
        api.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("kube:")], "reflector threads left"


async def synced(start_source: StartSource, catalog: catalog_mod.Catalog, **options: Any) -> kubesource.KubeSource:
    source = await start_source(catalog, **options)
    assert await source.wait_synced(10), "no first sync"
    return source


async def test_initial_sync_gives_service_values_with_localities_from_nodes(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    recorder = Recorder(catalog)
    source = await synced(start_source, catalog)
    assert source.synced and catalog.ready() and not source.stale
    assert len(recorder.seen) == 1 and recorder.seen[0][0].services == {WEB, API}  # one apply, everything in it
    web = catalog.services[WEB]
    assert web.ports == (model.ServicePort("http", 80, model.Protocol.HTTP),)
    assert web.clusters == (C1,)
    assert sorted(web.endpoints, key=lambda e: e.address) == [
        model.Endpoint("10.0.0.1", (("http", 8080),), model.Locality("eu", "eu-a", "c1"),
                       (("app", "web"), ("version", "v1"))),
        model.Endpoint("10.0.0.2", (("http", 8080),), model.Locality("us", "us-b", "c1"),
                       (("app", "web"), ("version", "v2"))),
        # node unknown: the slice's zone, the configured default region
        model.Endpoint("10.0.0.3", (("http", 8080),), model.Locality("eu", "eu-c", "c1")),
    ]
    api = catalog.services[API]
    assert api.ports == (model.ServicePort("grpc", 9090, model.Protocol.GRPC),)
    assert [(e.address, e.ports, e.locality) for e in api.endpoints] == [
        ("10.0.1.1", (("grpc", 9091),), model.Locality("eu", "eu-a", "c1"))
    ]


async def test_health_and_node_changes_reach_the_catalog(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    recorder = Recorder(catalog)
    await synced(start_source, catalog)
    fake.put("endpointslices", web_slice(
        endpoint("10.0.0.1", node_name="n1", pod="web-1", ns="shop", ready=False),
        endpoint("10.0.0.2", node_name="n2", pod="web-2", ns="shop", ready=False, serving=True, terminating=True),
    ))
    await wait_for(lambda: addresses(catalog, WEB) == {"10.0.0.1": model.Health.UNHEALTHY,
                                                       "10.0.0.2": model.Health.DRAINING,
                                                       "10.0.0.3": model.Health.HEALTHY}, what="health change")
    assert recorder.seen[-1][0].services == {WEB}  # only the service that changed
    fake.put("nodes", node("n1", "eu", "eu-z"))  # relabelled: web and api have endpoints there
    await wait_for(lambda: catalog.services[API].endpoints[0].locality.zone == "eu-z", what="node relabel")
    assert recorder.seen[-1][0].services == {WEB, API}
    n = len(recorder.seen)
    fake.put("pods", {**pod("web-1", "shop", {"app": "web", "version": "v1"}), "status": {"phase": "Succeeded"}})
    fake.put("pods", pod("web-2", "shop", {"app": "web", "version": "v3"}))
    v3 = (("app", "web"), ("version", "v3"))
    await wait_for(lambda: any(e.labels == v3 for e in catalog.services[WEB].endpoints), what="pod relabel")
    assert len(recorder.seen) == n + 1  # the pod's status change was no change to us


async def test_watch_410_relists_and_applies_only_real_changes(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    fake.put("services", service("steady", "shop", ports=HTTP))
    fake.put("endpointslices", endpoint_slice("steady-a", "shop", "steady", [endpoint("10.0.2.1")],
                                              ports=[{"name": "http", "port": 8080}]))
    catalog = catalog_mod.Catalog([C1])
    recorder = Recorder(catalog)
    await synced(start_source, catalog, page_size=1)  # a re-list in many pages
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")
    requests_before = len(fake.requests)
    before = len(recorder.seen)
    # While the server holds everything back, the watches drop, things change, and history is compacted:
    # the re-watch from the old resourceVersion gets 410 Gone and the reflectors must list again.
    fake.stall(True)
    fake.drop_watches()
    fake.put("endpointslices", web_slice(endpoint("10.0.0.1", node_name="n1", pod="web-1", ns="shop", ready=False),
                                         endpoint("10.0.0.2", node_name="n2", pod="web-2", ns="shop")))
    fake.delete("endpointslices", "shop", "api-a")
    fake.put("services", service("new", "shop", ports=HTTP))
    fake.put("endpointslices", endpoint_slice("new-a", "shop", "new", [endpoint("10.0.3.1")],
                                              ports=[{"name": "http", "port": 8080}]))
    fake.put("services", service("steady", "shop", ports=HTTP))  # stored again, unchanged: no real change
    fake.expire()
    fake.stall(False)
    new = model.service_key("shop", "new")
    await wait_for(lambda: addresses(catalog, new) == {"10.0.3.1": model.Health.HEALTHY}
                   and addresses(catalog, API) == {}
                   and addresses(catalog, WEB) == {"10.0.0.1": model.Health.UNHEALTHY,
                                                   "10.0.0.2": model.Health.HEALTHY,
                                                   "10.0.0.3": model.Health.HEALTHY}, what="converged after 410")
    def relisted() -> set[str]:
        return {r.path.rsplit("/", 1)[-1] for r in fake.requests[requests_before:] if not r.watch}

    # A change is published as soon as its own kind is listed again, perhaps before the other kinds are.
    await wait_for(lambda: relisted() == {"services", "endpointslices", "nodes", "pods"}, what="every kind re-listed")
    changes = recorder.since(before)
    steady = model.service_key("shop", "steady")
    assert all(steady not in change.services for change, _ in changes), "an unchanged service was re-published"
    for change, snapshot in changes:
        assert change.services, "a change with nothing in it"
        # web and steady have endpoints all along: never empty, never gone, in any published snapshot
        assert len(snapshot[WEB].endpoints) == 3 and len(snapshot[steady].endpoints) == 1
    assert {k for change, _ in changes for k in change.services} == {WEB, API, new}


async def test_dropped_watches_rewatch_from_last_version_and_converge(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    source = await synced(start_source, catalog)
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")
    lists_before = sum(1 for r in fake.requests if not r.watch)
    for round_ in range(3):
        await wait_for(lambda: fake.open_watches() == 4, what="every watch open again")  # drop streams, not requests
        fake.drop_watches()
        fake.put("endpointslices", web_slice(endpoint(f"10.0.9.{round_}", node_name="n1")))
        await wait_for(lambda r=round_: f"10.0.9.{r}" in (addresses(catalog, WEB) or {}), what="change after drop")
    assert sum(1 for r in fake.requests if not r.watch) == lists_before, "a dropped watch is re-opened, not re-listed"
    rewatches = [r for r in fake.requests if r.watch and r.path.endswith("/endpointslices")]
    assert all(r.query.get("resourceVersion") not in (None, "", "0") for r in rewatches)
    assert not source.stale


@pytest.mark.parametrize("clean", [False, True], ids=["hung-up", "ended"])
async def test_a_quiet_watch_cut_again_and_again_is_reopened_at_once(
    fake: FakeKubeAPI, start_source: StartSource, clean: bool
) -> None:
    """A proxy that closes streams idle for 1.2 s (sooner than the server's bookmarks) cuts the quiet watches
    (nodes, services) again and again, with nothing in them. Each cut watch is re-opened at once from where it
    was, so a change made after the fifth cut arrives as fast as any other: a cut is not a failure."""
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    arrivals: list[tuple[float, Mapping[model.ServiceKey, model.Service]]] = []
    catalog.subscribe(lambda change: arrivals.append((time.monotonic(), catalog.services)))
    shipped = kubesource.KubeOptions()  # the shipped backoff, not FAST's: what a cut counted as a failure costs
    source = await synced(start_source, catalog, backoff_initial=shipped.backoff_initial,
                          backoff_max=shipped.backoff_max)
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")
    lists = sum(1 for r in fake.requests if not r.watch)
    quiet = ("nodes", "services")
    fake.cut_idle_watches(1.2, resources=quiet, clean=clean)

    def cuts(resource: str) -> list[float]:
        return [at for r, at in fake.cuts if r == resource]

    for n in range(1, 6):
        await wait_for(lambda n=n: all(len(cuts(r)) >= n for r in quiet), timeout=5, what=f"cut {n}")
    began, seen = time.monotonic(), len(arrivals)
    fake.put("nodes", node("n1", "eu", "eu-z"))
    fake.put("services", service("api", "shop", ports=[{"name": "grpc", "port": 9100}]))

    def arrived(services: Mapping[model.ServiceKey, model.Service]) -> bool:
        return services[API].endpoints[0].locality.zone == "eu-z" and services[API].ports[0].port == 9100

    await wait_for(lambda: any(arrived(services) for _, services in arrivals[seen:]), timeout=40,
                   what="the changes made after the fifth cut")
    latency = next(t for t, services in arrivals[seen:] if arrived(services)) - began
    reopened = {r: [min(q.at for q in fake.requests if q.watch and q.path.endswith(f"/{r}") and q.at > cut) - cut
                    for cut in cuts(r)[:5]] for r in quiet}
    measured = (f"changes made after the fifth cut arrived in {latency * 1000:.0f} ms; watches re-opened after "
                f"each cut in (ms) {({r: [round(t * 1000) for t in ts] for r, ts in reopened.items()})}")
    print(measured)
    assert latency < 0.25 and all(t < 0.25 for ts in reopened.values() for t in ts), measured
    assert sum(1 for r in fake.requests if not r.watch) == lists, "a cut watch is watched again, not listed"
    assert not source.stale


async def test_a_watch_that_ends_at_once_with_nothing_in_it_backs_off(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    """A server (or proxy) that ends every watch as soon as it opens is not watched again in a spin."""
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    source = await synced(start_source, catalog)  # FAST: backoff from 0.05 s up to 0.2 s
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")
    fake.cut_idle_watches(0.0, resources=("services",), clean=True)
    began, watches = time.monotonic(), sum(1 for r in fake.requests if r.watch and r.path.endswith("/services"))
    await wait_for(lambda: sum(1 for _ in fake.cuts) >= 10, what="ten watches ended at once")
    elapsed = time.monotonic() - began
    rewatched = sum(1 for r in fake.requests if r.watch and r.path.endswith("/services")) - watches
    # waits of 0, 0.025-0.05, 0.05-0.1, then 0.1-0.2 s: ten re-watches take at least 0.6 s; a spin, milliseconds
    assert elapsed > 0.6, f"{rewatched} watches in {elapsed:.3f} s"
    assert not source.stale, "a server that answers is reachable"
    fake.cut_idle_watches(None)
    fake.put("services", service("late", "shop", ports=HTTP))
    fake.put("endpointslices", endpoint_slice("late-a", "shop", "late", [endpoint("10.0.5.1")],
                                              ports=[{"name": "http", "port": 8080}]))
    await wait_for(lambda: model.service_key("shop", "late") in catalog.services, what="watching again")


async def test_bookmarks_advance_the_watch(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    await synced(start_source, catalog, watch_timeout=1.0)
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")
    fake.put("namespaces", {"metadata": {"name": "elsewhere"}})  # moves the resourceVersion, no event for us
    fake.send_bookmarks()
    current = fake.resource_version
    # the watch ends after its timeoutSeconds and is re-opened from the newest version it saw: the bookmark's
    await wait_for(lambda: any(r.watch and r.path.endswith("/services") and r.query.get("resourceVersion") == current
                               for r in fake.requests), what="re-watch from the bookmark's version")


async def test_unreachable_marks_stale_keeps_endpoints_and_recovers_without_gap(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    recorder = Recorder(catalog)
    source = await synced(start_source, catalog, page_size=1)
    before = len(recorder.seen)
    known = dict(catalog.services)
    with structlog.testing.capture_logs() as logs:
        fake.set_unreachable(True)
        await wait_for(lambda: source.stale and catalog.status()[C1].stale, what="stale")
        assert source.error and catalog.status()[C1].error == source.error
        assert catalog.services == known and catalog.ready(), "endpoints kept, readiness kept"
        fake.put("endpointslices", web_slice(endpoint("10.0.0.1", node_name="n1", pod="web-1", ns="shop"),
                                             endpoint("10.0.0.5", node_name="n2")))  # changed while we are away
        await wait_for(lambda: sum(1 for e in logs if e["event"] == "kubernetes API request failed") >= 3,
                       what="retries")
        fake.set_unreachable(False)
        await wait_for(lambda: not source.stale and not catalog.status()[C1].stale, what="recovered")
        await wait_for(lambda: set(addresses(catalog, WEB) or ()) == {"10.0.0.1", "10.0.0.5", "10.0.0.3"},
                       what="converged")
    failures = [e for e in logs if e["event"] == "kubernetes API request failed"]
    assert all(e["cluster"] == "c1" for e in failures)
    assert recorder.since(before), "the change made during the outage arrived"
    for change, snapshot in recorder.since(before):
        assert WEB in change.services and snapshot[WEB].endpoints and snapshot[API].endpoints  # no gap


async def test_stale_ttl_drops_endpoints_and_recovery_restores_them(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    source = await synced(start_source, catalog, stale_ttl=0.3)
    with structlog.testing.capture_logs() as logs:
        fake.set_unreachable(True)
        await wait_for(lambda: not catalog.services, what="stale endpoints dropped after the ttl")
    assert source.stale
    assert [e for e in logs if "stale_ttl" in e["event"]], "the drop is logged"
    fake.set_unreachable(False)
    await wait_for(lambda: set(catalog.services) == {WEB, API} and not source.stale, what="restored")


async def test_stalled_server_is_detected(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    source = await synced(start_source, catalog, watch_timeout=1.0, request_timeout=1.0)
    fake.stall(True)  # requests hang, open watches go silent
    began = time.monotonic()
    await wait_for(lambda: source.stale, timeout=8, what="a stalled server noticed")
    assert time.monotonic() - began < 5  # within watch timeout + read timeout (+ one timed-out request)
    assert "timed out" in source.error
    assert set(catalog.services) == {WEB, API}
    fake.stall(False)
    await wait_for(lambda: not source.stale and not catalog.status()[C1].stale, timeout=8, what="recovered")


async def test_nothing_applied_before_the_first_list(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    fake.set_unreachable(True)
    catalog = catalog_mod.Catalog([C1])
    recorder = Recorder(catalog)
    source = await start_source(catalog)
    await wait_for(lambda: source.stale, what="unreachable from the start")
    assert not await source.wait_synced(0.3)
    assert not source.synced and not catalog.ready() and recorder.seen == [] and catalog.services == {}
    fake.set_unreachable(False)
    assert await source.wait_synced(10)
    assert set(catalog.services) == {WEB, API} and catalog.ready() and not catalog.status()[C1].stale


async def test_pagination_with_a_thousand_services(fake: FakeKubeAPI, start_source: StartSource) -> None:
    fake.put("nodes", node("n1", "eu", "eu-a"))
    for i in range(1000):
        fake.put("services", service(f"s{i}", "big", ports=HTTP))
        fake.put("endpointslices", endpoint_slice(f"s{i}-a", "big", f"s{i}", [endpoint(f"10.1.{i // 250}.{i % 250}",
                                                                                       node_name="n1")],
                                                  ports=[{"name": "http", "port": 8080}]))
    catalog = catalog_mod.Catalog([C1])
    await synced(start_source, catalog, page_size=100, watch_pods=False)
    assert len(catalog.services) == 1000
    assert all(len(s.endpoints) == 1 for s in catalog.services.values())
    pages = [r for r in fake.requests if r.path == "/api/v1/services" and not r.watch]
    assert len(pages) == 10 and all(r.query["limit"] == "100" for r in pages)
    assert "continue" not in pages[0].query and all(r.query.get("continue") for r in pages[1:])
    assert not any(r.path == "/api/v1/pods" for r in fake.requests)  # watch_pods=False


ORPHANED = "endpoint slices without their service: left out"  # the line an operator sees


def orphan_warnings(logs: list[dict[str, Any]]) -> list[str]:
    return [e["object"] for e in logs if e["event"] == ORPHANED and e["log_level"] == "warning"]


def waiting(logs: list[dict[str, Any]], key: model.ServiceKey) -> bool:
    """Whether the slices of `key` are past their grace, held back until the services watch catches up."""
    return any(e["event"].endswith("waiting for the services watch") and e["object"] == f"Service {key}"
               for e in logs)


def cart_slice(*addresses: str, name: str = "cart-a", service_name: str = "cart") -> dict[str, Any]:
    return endpoint_slice(name, "shop", service_name, [endpoint(a, node_name="n1") for a in addresses],
                          ports=[{"name": "http", "port": 8080}])


CART = model.service_key("shop", "cart")


async def test_service_deleted_before_its_slices(fake: FakeKubeAPI, start_source: StartSource) -> None:
    """The EndpointSlice controller removes a deleted Service's slices a moment later: a normal ordering."""
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    recorder = Recorder(catalog)
    await synced(start_source, catalog)
    with structlog.testing.capture_logs() as logs:
        fake.delete("services", "shop", "web")
        await wait_for(lambda: WEB not in catalog.services, what="service dropped")
        for i in range(3):  # the slices live on for a while, and change
            fake.put("endpointslices", web_slice(endpoint(f"10.0.0.{i}", node_name="n1")))
        n = len(recorder.seen)
        fake.delete("endpointslices", "shop", "web-a")
        fake.delete("endpointslices", "shop", "web-b")
        fake.put("endpointslices", endpoint_slice("api-a", "shop", "api", [endpoint("10.0.1.2", node_name="n1")],
                                                  ports=[{"name": "grpc", "port": 9091}]))
        await wait_for(lambda: addresses(catalog, API) == {"10.0.1.2": model.Health.HEALTHY}, what="api still works")
    assert [c.services for c, _ in recorder.seen[n:]] == [{API}]  # the orphan slices published nothing
    assert orphan_warnings(logs) == []  # gone within the grace: nothing to tell the operator


@pytest.mark.parametrize("lag", ["within the grace", "past the grace"])
async def test_a_slice_whose_service_comes_on_a_later_watch_event_gives_no_warning(
    fake: FakeKubeAPI, start_source: StartSource, lag: str
) -> None:
    """A Service and its slice written a millisecond apart, the slice's watch delivering first.

    Past the grace, time alone does not decide: the services watch has not reached the slice's resourceVersion.
    """
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    source = await synced(start_source, catalog, **({"orphan_grace": 0.1} if lag == "past the grace" else {}))
    slices = source._by_resource["endpointslices"][""]
    with structlog.testing.capture_logs() as logs:
        fake.hold_watches(("services",))
        fake.put("services", service("cart", "shop", ports=HTTP))
        fake.put("endpointslices", cart_slice("10.0.2.1"))
        await wait_for(lambda: "shop/cart-a" in slices.store and source._flush_handle is None and not source._dirty,
                       what="the slice handled before its service")
        if lag == "past the grace":
            await wait_for(lambda: orphan_warnings(logs) or waiting(logs, CART),
                           what="the slice past its grace, waiting for the services watch")
        assert CART not in catalog.services
        fake.hold_watches(())
        await wait_for(lambda: addresses(catalog, CART) == {"10.0.2.1": model.Health.HEALTHY},
                       what="cart served once its service came")
    assert orphan_warnings(logs) == []


async def test_a_real_orphan_is_reported_once_when_the_services_watch_has_caught_up(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    populate(fake)
    fake.put("endpointslices", cart_slice("10.0.3.1", name="ghost-a", service_name="ghost"))  # no Service, ever
    catalog = catalog_mod.Catalog([C1])
    with structlog.testing.capture_logs() as logs:
        source = await synced(start_source, catalog, orphan_grace=0.1)
        # Listed at one resourceVersion: the services list has caught up with the slices already.
        await wait_for(lambda: orphan_warnings(logs), what="the orphan from the first list reported")
        # After the sync: the services watch reaches the slice's version only with a bookmark (nothing else
        # changes in services), and the slice is held back until then.
        fake.put("endpointslices", cart_slice("10.0.3.2", name="lost-a", service_name="lost"))
        lost = model.service_key("shop", "lost")
        await wait_for(lambda: len(orphan_warnings(logs)) > 1 or waiting(logs, lost),
                       what="the new orphan waiting for the services watch")
        assert orphan_warnings(logs) == ["Service shop/ghost"]
        fake.send_bookmarks()
        await wait_for(lambda: len(orphan_warnings(logs)) == 2, what="the new orphan reported")
        # A Service deleted for good while its slices stay: reported too, once it has been so for the grace.
        fake.delete("services", "shop", "web")
        await wait_for(lambda: len(orphan_warnings(logs)) == 3, what="the deleted service's slices reported")
        for i in range(3):  # the orphans' slices change; the sources settle again and again
            fake.put("endpointslices", cart_slice(f"10.0.4.{i}", name="ghost-a", service_name="ghost"))
            fake.put("endpointslices", cart_slice(f"10.0.5.{i}", name="lost-a", service_name="lost"))
            fake.put("endpointslices", web_slice(endpoint(f"10.0.6.{i}", node_name="n1")))
            fake.send_bookmarks()
        fake.put("endpointslices", endpoint_slice("api-a", "shop", "api", [endpoint("10.0.1.2", node_name="n1")],
                                                  ports=[{"name": "grpc", "port": 9091}]))
        await wait_for(lambda: addresses(catalog, API) == {"10.0.1.2": model.Health.HEALTHY},
                       what="the slice events after them handled")
        await wait_for(lambda: source._orphan_handle is None, what="no orphan left to judge")
    assert orphan_warnings(logs) == ["Service shop/ghost", "Service shop/lost", "Service shop/web"]
    assert [e["slices"] for e in logs if e["event"] == ORPHANED] == [1, 1, 2]
    assert WEB not in catalog.services and CART not in catalog.services


async def test_an_orphan_is_reported_after_the_backstop_when_the_services_watch_says_nothing(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    """A server that sends no bookmarks: a services watch silent for bookmark_silence is not hiding a Service."""
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    with structlog.testing.capture_logs() as logs:
        source = await synced(start_source, catalog, orphan_grace=0.1, bookmark_silence=0.5)
        fake.put("endpointslices", cart_slice("10.0.3.2", name="lost-a", service_name="lost"))
        await wait_for(lambda: orphan_warnings(logs), what="the orphan reported after the backstop")
    (warning,) = [e for e in logs if e["event"] == ORPHANED]
    assert warning["object"] == "Service shop/lost" and warning["for_seconds"] >= 0.5
    assert source._orphan_handle is None


async def test_an_orphan_that_recurs_is_reported_again(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    fake.put("endpointslices", cart_slice("10.0.3.1"))
    catalog = catalog_mod.Catalog([C1])
    with structlog.testing.capture_logs() as logs:
        await synced(start_source, catalog, orphan_grace=0.1)
        await wait_for(lambda: orphan_warnings(logs), what="reported")
        fake.put("services", service("cart", "shop", ports=HTTP))
        await wait_for(lambda: CART in catalog.services, what="its service came")
        fake.delete("services", "shop", "cart")
        await wait_for(lambda: len(orphan_warnings(logs)) == 2, what="reported again")
    assert [e["event"] for e in logs if e.get("object") == "Service shop/cart"] == [
        ORPHANED, "endpoint slices have their service now", ORPHANED]


async def test_bad_data_is_skipped_and_logged_once_not_per_event(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    with structlog.testing.capture_logs() as logs:
        await synced(start_source, catalog)
        for i in range(3):  # three events about each broken object
            fake.put("endpointslices", endpoint_slice("web-fqdn", "shop", "web", [endpoint(f"web{i}.example.com")],
                                                      address_type="FQDN"))
            fake.put("endpointslices", {**web_slice(name="web-broken"), "endpoints": f"not a list {i}"})
            fake.put("nodes", {"metadata": {"name": "n3", "labels": {"tick": str(i)}}})  # no topology labels
            fake.put("endpointslices", web_slice(endpoint("10.0.0.1", node_name="n1"), {"addresses": []},
                                                 endpoint(f"10.0.7.{i}", node_name="n3")))
        # Nodes come on their own watch stream: a sentinel node after the three n3 events tells when the
        # node reflector has handled all of them (api's endpoint on n4 gets n4's zone only then).
        fake.put("endpointslices", endpoint_slice("api-a", "shop", "api", [endpoint("10.0.1.9", node_name="n4")],
                                                  ports=[{"name": "grpc", "port": 9091}]))
        fake.put("nodes", node("n4", "eu", "eu-d"))
        await wait_for(lambda: "10.0.7.2" in (addresses(catalog, WEB) or {}), what="the last good slice event")
        await wait_for(lambda: [e.locality.zone for e in catalog.services[API].endpoints] == ["eu-d"],
                       what="the last node event")
    problems = sorted((e["event"], e["object"]) for e in logs if e.get("log_level") == "warning"
                      and e["event"] not in ("cluster stale, keeping last known endpoints",))
    assert problems == [
        ("FQDN endpoint slice skipped", "EndpointSlice shop/web-fqdn"),
        ("node without topology labels", "Node n3"),
        ("object could not be read, skipped", "EndpointSlice shop/web-broken"),
        ("slice endpoint without addresses skipped", "EndpointSlice shop/web-a"),
    ]
    web = catalog.services[WEB]  # the good parts of the same objects still count
    assert {e.address for e in web.endpoints} == {"10.0.0.1", "10.0.7.2", "10.0.0.3"}
    assert next(e for e in web.endpoints if e.address == "10.0.7.2").locality == model.Locality("eu", "", "c1")


async def test_namespaces_option_watches_only_those(fake: FakeKubeAPI, start_source: StartSource) -> None:
    populate(fake)
    fake.put("services", service("other", "elsewhere", ports=HTTP))
    catalog = catalog_mod.Catalog([C1])
    await synced(start_source, catalog, namespaces=("shop",))
    assert set(catalog.services) == {WEB, API}
    assert any(r.path == "/api/v1/namespaces/shop/services" for r in fake.requests)


class _SilentWatchHandler(http.server.BaseHTTPRequestHandler):
    """Lists answer (empty); a watch gets its headers and then nothing, ever: a server that hangs mid-stream."""

    protocol_version = "HTTP/1.1"
    release: threading.Event

    def do_GET(self) -> None:
        if "watch=true" not in self.path:
            body = b'{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.release.wait(30)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Owner:
    def __init__(self) -> None:
        self.reachable: list[bool] = []
        self.listed = 0

    def on_change(self, *args: Any) -> None:
        pass

    def on_listed(self, *args: Any) -> None:
        self.listed += 1

    def on_reachable(self, reflector: Any, reachable: bool, error: str) -> None:
        self.reachable.append(reachable)


async def test_a_watch_gone_silent_is_detected_and_stop_is_prompt() -> None:
    """The body read timeout (watch timeout + request timeout) catches a stream that stops mid-way."""
    release = threading.Event()
    handler = type("Handler", (_SilentWatchHandler,), {"release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "x",
              "clusters": [{"name": "x", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
              "users": [{"name": "x", "user": {"token": "t"}}],
              "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}
    api = kubernetes.config.new_client_from_config_dict(config)
    client = kube.private_client(api)
    owner = _Owner()
    reflector: kube.Reflector[Any] = kube.Reflector(
        api_client=client, resource="services", decode=kubemodel.service_record, owner=owner,
        problems=kubemodel.Problems(), options=kube.ReflectorOptions(watch_timeout=1, request_timeout=0.5,
                                                                    backoff_initial=0.05, backoff_max=0.1))
    try:
        reflector.start(asyncio.get_running_loop())
        began = time.monotonic()
        await wait_for(lambda: owner.reachable == [False], timeout=5, what="silent watch noticed")
        assert 1.4 < time.monotonic() - began < 3  # not before the watch could have ended by itself
        await wait_for(lambda: owner.reachable == [False, True] and owner.listed == 2, what="listed again")
    finally:
        began = time.monotonic()
        reflector.stop()  # blocked in the silent watch again: shutting the socket wakes it
        await reflector.join()
        assert time.monotonic() - began < 0.5
        release.set()
        server.shutdown()
        server.server_close()
        serving.join()
        client.close()
        api.close()


def _bare_reflector(api_client: Any, owner: _Owner, **options: Any) -> kube.Reflector[Any]:
    return kube.Reflector(api_client=api_client, resource="services", decode=kubemodel.service_record, owner=owner,
                          problems=kubemodel.Problems(), options=kube.ReflectorOptions(**options))


def test_backoff_delay_is_capped_exponential_with_equal_jitter() -> None:
    api = kubernetes.client.ApiClient()
    reflector = _bare_reflector(api, _Owner(), backoff_initial=0.1, backoff_max=1.0)
    means = []
    for attempt in range(1, 10):
        step = min(1.0, 0.1 * 2 ** (attempt - 1))  # 0.1, 0.2, 0.4, 0.8, then the cap
        delays = [reflector._delay(attempt) for _ in range(300)]
        assert all(step / 2 <= d <= step for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > step / 4, "no jitter"  # spread over [step/2, step]
        means.append(sum(delays) / len(delays))
    assert all(later > 1.5 * earlier for earlier, later in itertools.pairwise(means[:4])), means  # doubles
    assert all(0.5 <= m <= 1.0 for m in means[4:]), means  # capped at backoff_max
    api.close()


def test_no_retry_waits_longer_than_the_shipped_cap_of_4_s() -> None:
    """What bounds recovery once the API server is back (docs/kubernetes.md): the longest wait between attempts."""
    api = kubernetes.client.ApiClient()
    reflector = kube.Reflector(api_client=api, resource="services", decode=kubemodel.service_record, owner=_Owner(),
                               problems=kubemodel.Problems(), options=kubesource.KubeOptions().reflector_options())
    waits = {n: [reflector._delay(n) for _ in range(200)] for n in range(1, 40)}
    assert max(max(w) for w in waits.values()) <= 4.0, {n: round(max(w), 1) for n, w in waits.items()}
    assert min(waits[1]) >= 0.25 and max(waits[1]) <= 0.5  # the first retry: within half a second
    assert min(waits[39]) >= 2.0  # a server that stays away is not hammered: at least 2 s between attempts
    api.close()


@pytest.mark.slow
async def test_recovery_after_an_outage_takes_at_most_the_backoff_cap(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    """The API server is away long enough for six failed attempts in a row; once it is back, the cluster
    converges to what changed meanwhile within the shipped backoff cap (4 s) and a list."""
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    shipped = kubesource.KubeOptions()
    source = await synced(start_source, catalog, backoff_initial=shipped.backoff_initial,
                          backoff_max=shipped.backoff_max)
    with structlog.testing.capture_logs() as logs:
        fake.set_unreachable(True)
        fake.put("endpointslices", web_slice(endpoint("10.0.0.7", node_name="n1")))  # changed while we are away

        def failed(resource: str) -> int:
            return max((e["failures"] for e in logs
                        if e["event"] == "kubernetes API request failed" and e["resource"] == resource), default=0)

        await wait_for(lambda: all(failed(r) >= 6 for r in ("services", "endpointslices", "nodes", "pods")),
                       timeout=60, what="six failures in a row for each kind")
        outage = time.monotonic()
        fake.set_unreachable(False)
        await wait_for(lambda: not source.stale and set(addresses(catalog, WEB) or ()) == {"10.0.0.7", "10.0.0.3"},
                       timeout=40,
                       what="converged after the outage")
    recovery = time.monotonic() - outage
    print(f"converged {recovery:.2f} s after the API server came back")
    assert recovery < 5.0, f"converged {recovery:.2f} s after the API server came back"  # the 4 s cap and a list


async def test_retries_back_off_further_with_each_failure_and_start_over_after_recovery(
    fake: FakeKubeAPI,
) -> None:
    """Through the real client and an unreachable server: failure n in a row waits _delay(n) before retrying."""
    populate(fake)
    fake.set_unreachable(True)
    api = kubernetes.config.new_client_from_config_dict(fake.kubeconfig(cluster="c1"))
    client = kube.private_client(api)
    owner = _Owner()
    reflector = _bare_reflector(client, owner, backoff_initial=0.05, backoff_max=0.2, request_timeout=2.0)
    waits: list[tuple[int, float, float]] = []  # (attempt, delay, when the wait began)
    real_delay = reflector._delay

    def recording_delay(attempt: int) -> float:
        delay = real_delay(attempt)
        waits.append((attempt, delay, time.monotonic()))
        return delay

    reflector._delay = recording_delay  # type: ignore[method-assign]
    try:
        reflector.start(asyncio.get_running_loop())
        await wait_for(lambda: len(waits) >= 6, what="six failed attempts")
        attempts = [a for a, _, _ in waits[:6]]
        assert attempts == [1, 2, 3, 4, 5, 6], attempts
        for (_, delay, began), (_, _, next_began) in itertools.pairwise(waits[:6]):
            assert next_began - began >= delay - 0.005, "retried before its backoff delay"
        assert [round(min(0.2, 0.05 * 2 ** (a - 1)), 3) for a in attempts] == [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
        assert all(min(0.2, 0.05 * 2 ** (a - 1)) / 2 <= d <= min(0.2, 0.05 * 2 ** (a - 1)) for a, d, _ in waits)

        fake.set_unreachable(False)
        await wait_for(lambda: owner.reachable[-1:] == [True] and owner.listed == 1, what="listed")
        await wait_for(lambda: fake.open_watches() == 1, what="watching")
        # A server that answers a list and then fails again keeps its backoff (it may be flapping); a
        # watch that delivers shows it is back for good, and the next outage starts from the first step.
        fake.put("services", service("late", "shop", ports=HTTP))
        await wait_for(lambda: "shop/late" in reflector.store, what="an event through the watch")
        seen = len(waits)
        fake.set_unreachable(True)
        await wait_for(lambda: len(waits) >= seen + 2, what="failures after recovery")
        assert [a for a, _, _ in waits[seen:seen + 2]] == [1, 2]
    finally:
        reflector.stop()
        await reflector.join()
        client.close()
        api.close()


async def test_a_stall_is_caught_sooner_once_the_server_has_shown_periodic_bookmarks(
    fake: FakeKubeAPI, start_source: StartSource
) -> None:
    populate(fake)
    catalog = catalog_mod.Catalog([C1])
    # Watches of 30 s: without bookmarks a silent stream may be a quiet one for 30 s (+ the read timeout).
    source = await synced(start_source, catalog, watch_timeout=30.0, request_timeout=0.5, bookmark_silence=1.0)
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")
    assert not any(r.periodic_bookmarks for r in source._reflectors)
    fake.put("namespaces", {"metadata": {"name": "elsewhere"}})
    fake.send_bookmarks()  # mid-watch, long before its end: the server sends them periodically
    await wait_for(lambda: all(r.periodic_bookmarks for r in source._reflectors), what="bookmarks seen")
    fake.stall(True)  # open watches go silent, requests hang
    began = time.monotonic()
    await wait_for(lambda: source.stale, timeout=8, what="the stall noticed")
    assert time.monotonic() - began < 4, "judged by the 30 s watch timeout, not the bookmark silence"
    assert "timed out" in source.error and set(catalog.services) == {WEB, API}
    fake.stall(False)
    await wait_for(lambda: not source.stale, timeout=8, what="recovered")


async def test_orphans_are_still_reported_after_judging_them_failed_once(
    fake: FakeKubeAPI, start_source: StartSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while judging orphans is logged and counted, and the checks go on (they used to stop for good)."""
    populate(fake)
    fake.put("endpointslices", cart_slice("10.0.3.1", name="ghost-a", service_name="ghost"))  # no Service, ever
    due, failures = orphans.Orphans.due, []

    def failing_once(self: orphans.Orphans, now: float, caught_up: Any) -> Any:
        if not failures:
            failures.append(now)
            raise RuntimeError("a bug of ours")
        return due(self, now, caught_up)

    monkeypatch.setattr(orphans.Orphans, "due", failing_once)
    before = aio.task_errors().get("kube-orphans", 0)
    catalog = catalog_mod.Catalog([C1])
    with structlog.testing.capture_logs() as logs:
        await synced(start_source, catalog, orphan_grace=0.1)
        await wait_for(lambda: orphan_warnings(logs), what="the orphan reported after the failure")
    assert failures and aio.task_errors()["kube-orphans"] == before + 1
    [failed] = [e for e in logs if e["event"].startswith("judging endpoint slices without their service failed")]
    assert failed["log_level"] == "error" and failed["cluster"] == C1
