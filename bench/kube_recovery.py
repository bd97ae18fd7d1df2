"""How soon one KubeSource sees a change after a watch cut, an API server outage and a refused start.

    .venv/bin/python bench/kube_recovery.py [--runs 3] [--outage 20] [--cut-after 3] [--cuts 6]

Against the fake API server (tests/fakekube), with the shipped KubeOptions (backoff from 0.5 s,
capped at 4 s), the real `kubernetes` client, and the catalog as the observer: times are from the
event (the change, the server's return) to the catalog holding the API server's new truth, which
is what a proxy then gets after the push loop's debounce.

- cuts: a proxy closes every watch after `--cut-after` seconds idle; after each cut of the nodes
  watch a node is relabelled, and nothing changes in services (a quiet kind, cut again and again
  with nothing in between). Prints how long each change took to arrive, and each cut watch to be
  asked for again.
- outage: the API server refuses connections for `--outage` seconds after the first sync (an
  EndpointSlice changes meanwhile); prints the time from its return to the change in the catalog.
- refused start: the same, with the API server refusing from the start; prints the time from its
  return to the first sync.

Mostly waiting: it costs little CPU, and is run with `--runs 3` for docs/kubernetes.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kubernetes

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import kubesource, model
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, service

CLUSTER = model.ClusterId("c1")
WEB = model.service_key("shop", "web")


def populate(fake: FakeKubeAPI) -> None:
    fake.put("nodes", node("n1", "eu", "eu-a"))
    fake.put("services", service("web", "shop", ports=[{"name": "http", "port": 80}]))
    fake.put("endpointslices", endpoint_slice("web-a", "shop", "web", [endpoint("10.0.0.1", node_name="n1")],
                                              ports=[{"name": "http", "port": 8080}]))


async def until(predicate: object, timeout: float) -> float:
    """time.monotonic() once `predicate()` holds (polled every millisecond)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("not converged")
        await asyncio.sleep(0.001)
    return time.monotonic()


async def start(fake: FakeKubeAPI) -> tuple[kubesource.KubeSource, catalog_mod.Catalog, object]:
    api = kubernetes.config.new_client_from_config_dict(fake.kubeconfig(cluster="c1"))
    catalog = catalog_mod.Catalog([CLUSTER])
    source = kubesource.KubeSource(CLUSTER, api, options=kubesource.KubeOptions(watch_pods=False))
    await source.start(catalog)
    return source, catalog, api


async def stop(source: kubesource.KubeSource, api: object) -> None:
    await source.stop()
    api.close()  # type: ignore[attr-defined]


def zone(catalog: catalog_mod.Catalog) -> str:
    svc = catalog.services.get(WEB)
    return svc.endpoints[0].locality.zone if svc and svc.endpoints else ""


def reopened_after(fake: FakeKubeAPI, resource: str) -> list[float]:
    """For each cut of `resource`'s watch: seconds until the next watch of it was asked for."""
    watches = [q.at for q in fake.requests if q.watch and q.path.endswith(f"/{resource}")]
    return [min((t for t in watches if t > cut), default=float("nan")) - cut for r, cut in fake.cuts if r == resource]


async def cuts(cut_after: float, count: int) -> tuple[list[float], list[float], list[float]]:
    """Seconds: each change made after a cut of the nodes watch took to arrive, and how long the nodes
    and the services watches (nothing changes in services: a quiet kind) took to be open again after each cut."""
    with FakeKubeAPI("c1") as fake:
        populate(fake)
        source, catalog, api = await start(fake)
        try:
            assert await source.wait_synced(10)
            fake.cut_idle_watches(cut_after)
            arrived = []
            for i in range(count):
                seen = sum(1 for r, _ in fake.cuts if r == "nodes")
                await until(lambda seen=seen: sum(1 for r, _ in fake.cuts if r == "nodes") > seen, cut_after + 30)
                began = time.monotonic()
                fake.put("nodes", node("n1", "eu", f"eu-{i}"))
                arrived.append(await until(lambda i=i: zone(catalog) == f"eu-{i}", 60) - began)
            return arrived, reopened_after(fake, "nodes")[:count], reopened_after(fake, "services")
        finally:
            await stop(source, api)


async def outage(seconds: float) -> float:
    with FakeKubeAPI("c1") as fake:
        populate(fake)
        source, catalog, api = await start(fake)
        try:
            assert await source.wait_synced(10)
            fake.set_unreachable(True)
            fake.put("endpointslices", endpoint_slice("web-a", "shop", "web", [endpoint("10.0.0.2", node_name="n1")],
                                                      ports=[{"name": "http", "port": 8080}]))
            await asyncio.sleep(seconds)
            fake.set_unreachable(False)
            back = time.monotonic()
            svc = lambda: catalog.services.get(WEB)  # noqa: E731
            done = await until(lambda: not source.stale and svc() is not None
                               and [e.address for e in svc().endpoints] == ["10.0.0.2"], 60)  # type: ignore[union-attr]
            return done - back
        finally:
            await stop(source, api)


async def refused_start(seconds: float) -> float:
    with FakeKubeAPI("c1") as fake:
        populate(fake)
        fake.set_unreachable(True)
        source, catalog, api = await start(fake)
        try:
            await asyncio.sleep(seconds)
            fake.set_unreachable(False)
            back = time.monotonic()
            done = await until(lambda: source.synced and WEB in catalog.services, 60)
            return done - back
        finally:
            await stop(source, api)


def ms(seconds: list[float]) -> str:
    return "[" + ", ".join("-" if math.isnan(t) else f"{t * 1000:.0f}" for t in seconds) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the API server is away")
    parser.add_argument("--cut-after", type=float, default=3.0, help="seconds idle before a watch is cut")
    parser.add_argument("--cuts", type=int, default=6)
    args = parser.parse_args()
    options = kubesource.KubeOptions()
    print(f"backoff {options.backoff_initial} s doubling to {options.backoff_max} s, jitter: half to all of it")

    arrived, nodes, services = asyncio.run(cuts(args.cut_after, args.cuts))
    print(f"watches cut after {args.cut_after} s idle: a node change made after each cut of the nodes watch "
          f"arrived in (ms) {ms(arrived)}; watched again after each cut (ms): nodes "
          f"{ms(nodes)}, services (quiet) {ms(services)} (-: not yet when the run ended)")
    for name, measure in (("outage", outage), ("refused start", refused_start)):
        times = [asyncio.run(measure(args.outage)) for _ in range(args.runs)]
        print(f"{name} of {args.outage:.0f} s: converged after its return in "
              f"{', '.join(f'{t:.2f}' for t in times)} s (max {max(times):.2f}, median {statistics.median(times):.2f})")


if __name__ == "__main__":
    main()
