"""Sync time and memory of one KubeSource on a big cluster, against the fake API server.

    .venv/bin/python bench/kube_sync.py [--services 5000] [--per-service 10] [--nodes 100] [--no-pods]

The fake API server runs in a child process, so the numbers are the source's own: peak RSS
(ru_maxrss) of this process, RSS once synced, and this process's CPU time for the sync.
Wall time includes the fake's work (it sorts every page it serves), so CPU time is the
better measure of what the source costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def serve(conn: multiprocessing.connection.Connection, services: int, per_service: int, nodes: int,
          pods: bool) -> None:
    """Child process: a populated fake API server until the parent says stop."""
    from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, pod, service

    fake = FakeKubeAPI("bench")
    for n in range(nodes):
        fake.put("nodes", node(f"node-{n}", f"region-{n % 3}", f"zone-{n % 9}"))
    for s in range(services):
        ns = f"ns-{s % 50}"
        fake.put("services", service(f"svc-{s}", ns, ports=[{"name": "http", "port": 80},
                                                             {"name": "grpc", "port": 9090}]))
        eps = []
        for e in range(per_service):
            i = s * per_service + e
            address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            name = f"svc-{s}-{e}"
            if pods:
                fake.put("pods", pod(name, ns, {"app": f"svc-{s}", "version": f"v{e % 2}"}, ip=address,
                                     node_name=f"node-{i % nodes}"))
            eps.append(endpoint(address, node_name=f"node-{i % nodes}", pod=name, ns=ns, ready=e % 10 != 9))
        fake.put("endpointslices", endpoint_slice(f"svc-{s}-abcde", ns, f"svc-{s}", eps,
                                                  ports=[{"name": "http", "port": 8080},
                                                         {"name": "grpc", "port": 9091}]))
    fake.start()
    conn.send(fake.kubeconfig(cluster="big"))
    conn.recv()
    fake.stop()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(kubeconfig: dict[str, object], pods: bool) -> dict[str, float]:
    import kubernetes

    from meshplane.discovery import catalog as catalog_mod
    from meshplane.discovery import kubesource, model

    api = kubernetes.config.new_client_from_config_dict(kubeconfig)
    catalog = catalog_mod.Catalog([model.ClusterId("big")])
    gc.collect()
    before = rss_mib()
    cpu0, wall0 = time.process_time(), time.monotonic()
    source = kubesource.KubeSource(model.ClusterId("big"), api, options=kubesource.KubeOptions(watch_pods=pods))
    await source.start(catalog)
    synced = await source.wait_synced(600)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    gc.collect()
    after = rss_mib()
    endpoints = sum(len(s.endpoints) for s in catalog.services.values())
    await source.stop()
    api.close()
    assert synced, "did not sync"
    return {"services": len(catalog.services), "endpoints": endpoints, "sync_wall_s": wall, "sync_cpu_s": cpu,
            "rss_before_mib": before, "rss_synced_mib": after,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--per-service", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--no-pods", action="store_true", help="do not watch pods (no labels on endpoints)")
    args = parser.parse_args()
    # Imported before the baseline, as a running control plane has them: the generated API modules are
    # loaded lazily and weigh ~20 MiB, which is not the cost of any object.
    import kubernetes

    from meshplane.discovery import kubesource  # noqa: F401

    _ = kubernetes.client.CoreV1Api, kubernetes.client.DiscoveryV1Api

    parent, child = multiprocessing.Pipe()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=serve, args=(child, args.services, args.per_service, args.nodes, not args.no_pods))
    began = time.monotonic()
    proc.start()
    kubeconfig = parent.recv()
    print(f"fake API server populated in {time.monotonic() - began:.1f}s "
          f"({args.services} services, {args.services * args.per_service} endpoints, {args.nodes} nodes, "
          f"pods {'watched' if not args.no_pods else 'not watched'})")
    try:
        result = asyncio.run(measure(kubeconfig, pods=not args.no_pods))
    finally:
        parent.send("stop")
        proc.join()
    print(f"synced {result['services']:.0f} services / {result['endpoints']:.0f} endpoints")
    print(f"sync time: {result['sync_wall_s']:.2f}s wall, {result['sync_cpu_s']:.2f}s CPU in the source's process")
    print(f"RSS: {result['rss_before_mib']:.0f} MiB before, {result['rss_synced_mib']:.0f} MiB synced "
          f"(+{result['rss_synced_mib'] - result['rss_before_mib']:.0f}), peak {result['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
