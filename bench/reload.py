"""A big policy reload beside everything else: does it hold up /healthz and endpoint pushes?

The policy is docs/policy.md's v2 example (a gateway `edge`, an HTTPRoute with a PathPrefix match)
with its route repeated R times under distinct names, hosts and paths (R = 5,000). Three parts:

  edits       an endpoint file renamed over, and rewritten in place, 40 times each: edit to the
              catalog's change (inotify; what a file is read on must not delay an ordinary edit)

  mechanism   in this process, the same validation (meshplane.policy.validate) run three ways while a
              ticker asks the event loop for a 5 ms sleep: on the loop, in a thread, in the worker
              process meshplane uses (meshplane.policy.worker). How late the ticks come is how long the
              loop was held: what a push, a stream or /healthz would wait.
  parsing     in this process, an endpoint file of 10,000 services edited (every entry changed, one entry
              changed; block style, and flow style, which is parsed whole) while the same ticker runs:
              parsed on the event loop (fileparse, as the file source did before issue 18's review), and
              as the file source does it now (FileSource.check: a few entries on the loop, more in a thread).
  end to end  `meshplane serve` as shipped (a subprocess), S services in one endpoint file, a simulated
              sidecar (the in-repo ADS client) watching one service's endpoints. The policy grows from
              one route to R (one file swap); 1 s later one endpoint moves (another file swap). Timed:
              the reload (swap -> the applied reload counted in /metrics), the move (swap -> the
              sidecar receives the assignment carrying it; and the same move with no reload running, as
              the baseline), and /healthz, asked every 50 ms from a thread during the reload (how long
              each answer took, and the longest).

    .venv/bin/python -m bench.reload                       # 5,000 routes, 3 end-to-end runs (about two minutes)
    .venv/bin/python -m bench.reload --routes 500 --repeat 1 --skip-mechanism   # smoke check
    .venv/bin/python -m bench.reload --parsing-only          # the endpoint file parsing alone (a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import common
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls

T = TypeVar("T")

EXAMPLE = """\
apiVersion: meshplane.io/v2
defaults:
  outlierDetection:
    consecutive5xxErrors: 1
    maxEjectionPercent: 100
  retries:
    attempts: 2
    retryOn: [connect-failure, refused-stream, unavailable, cancelled, "503"]
gateways:
  - name: edge
    listeners:
      - name: http
        port: 8080
        hostname: "*.example.com"
routes:
"""
ROUTE = """\
  - name: service{i}
    namespace: default
    parentRefs: [{{name: edge}}]
    hostnames: [service{i}.example.com]
    rules:
      - matches:
          - path: {{type: PathPrefix, value: /svc{i}}}
        backendRefs:
          - {{name: service{s}, port: 8000}}
"""


def policy(routes: int, services: int) -> str:
    return EXAMPLE + "".join(ROUTE.format(i=i, s=i % services) for i in range(routes))


def endpoints(services: int, moved_port: int) -> str:
    """One cluster's file; service0's one endpoint is at `moved_port` (the rest never change)."""
    lines = ["cluster: cluster-1", "region: r1", "services:"]
    for s in range(services):
        port = moved_port if s == 0 else 20000 + s
        lines += [f"- name: service{s}", "  ports: [{name: http, port: 8000}]", "  endpoints:",
                  f"  - {{address: 127.0.0.1, port: {port}, zone: z1}}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the loop's lag


async def lagged(work: Callable[[], Awaitable[T]]) -> tuple[T, float, list[float]]:
    """`work()` awaited while a ticker asks the event loop for 5 ms sleeps: its result, how long it took, and
    how late each tick came (what a push, a stream or /healthz would have waited)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - began - 0.005)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.2)
    began = time.perf_counter()
    result = await work()
    elapsed = time.perf_counter() - began
    stop.set()
    await tick
    return result, elapsed, lags


# --------------------------------------------------------------------------- mechanism


def mechanism(routes: int, services: int) -> dict[str, Any]:
    from meshplane.policy import validate, worker

    data = policy(routes, services).encode()

    async def one(way: str) -> dict[str, Any]:
        async def work() -> validate.LoadResult:
            if way == "event loop":
                return validate.load_policy_bytes(data, path="policy.yaml")
            if way == "thread":
                return await asyncio.to_thread(validate.load_policy_bytes, data, path="policy.yaml")
            return await worker.load(data, path="policy.yaml", known=None)

        result, elapsed, lags = await lagged(work)
        assert result.policy is not None and len(result.policy.routes) == routes, result.errors[:3]
        return {"way": way, "validation_s": round(elapsed, 2), "ticks": len(lags),
                "lag_ms": common.latency_summary(lags)}

    def worker_mb() -> dict[str, float]:
        """The worker's resident memory now, and its peak so far (MB)."""
        assert worker._process is not None
        status = dict(line.split(":", 1) for line in Path(f"/proc/{worker._process.pid}/status").read_text()
                      .splitlines() if ":" in line)
        return {key: round(int(status[field].split()[0]) / 1024, 1) for key, field in (("rss", "VmRSS"),
                                                                                      ("peak", "VmHWM"))}

    async def run() -> dict[str, Any]:
        # Both warmed up first: the worker started, and each side's first validation (pydantic builds its
        # validators then) done, so that each way is timed on the same footing.
        small = policy(2, services).encode()
        validate.load_policy_bytes(small, path="warm-up.yaml")
        began = time.perf_counter()
        await worker.load(small, path="warm-up.yaml", known=None)
        started = time.perf_counter() - began
        idle = worker_mb()
        ways = [await one(way) for way in ("event loop", "thread", "worker process")]
        after = worker_mb()
        result = validate.load_policy_bytes(data, path="policy.yaml")
        began = time.perf_counter()
        pickle.dumps((data, "policy.yaml", None), protocol=pickle.HIGHEST_PROTOCOL)
        request = time.perf_counter() - began
        began = time.perf_counter()
        answer = pickle.dumps((True, result), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(answer)
        back = time.perf_counter() - began
        return {"ways": ways, "worker": {"started_with_a_first_validation_s": round(started, 2),
                                         "idle_mb": idle["rss"], "after_mb": after["rss"], "peak_mb": after["peak"],
                                         "pickle_request_s": round(request, 3),
                                         "pickle_result_and_back_s": round(back, 3)}}

    return {"routes": routes, **asyncio.run(run())}


# --------------------------------------------------------------------------- parsing an endpoint file


def parsing(services: int) -> dict[str, Any]:
    """How long the event loop waits while an endpoint file of `services` services is parsed after an edit."""
    import logging

    import structlog
    import yaml

    from meshplane import gc_tuning
    from meshplane.discovery import catalog as catalog_mod
    from meshplane.discovery import fileparse, filesource

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    def text(port: int, *, changed: str, flow: bool) -> str:
        doc = yaml.safe_load(endpoints(services, 30000))
        for i, entry in enumerate(doc["services"]):
            if changed == "every entry" or i == 0:
                entry["endpoints"][0]["port"] = port + i
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=True if flow else None)

    async def one(directory: Path, *, layout: str, changed: str, way: str) -> dict[str, Any]:
        flow = layout == "flow"
        path = directory / f"{layout}-{changed.replace(' ', '-')}-{way.replace(' ', '-')}.yaml"
        path.write_text(text(30000, changed=changed, flow=flow))
        catalog = catalog_mod.Catalog()
        source = filesource.FileSource(path, interval=3600, inotify=False)
        await source.start(catalog)
        await source.watching()
        gc_tuning.tune_gc()  # as `serve` does once started
        last = fileparse.parse_changed(path.read_text(), path=str(path), last=None)[1] if way == "event loop" else None
        edited = text(40000, changed=changed, flow=flow)
        path.write_text(edited)
        async def work() -> None:
            if way == "event loop":
                fileparse.parse_changed(edited, path=str(path), last=last)
            else:
                await source.check(catalog)

        _, elapsed, lags = await lagged(work)
        await source.stop()
        if way != "event loop":
            assert catalog.services[filesource.model.service_key("default", "service0")].endpoints[0].port_for(
                "http") == 40000
        return {"layout": layout, "changed": changed, "way": way, "took_s": round(elapsed, 3), "ticks": len(lags),
                "lag_ms": common.latency_summary(lags)}

    async def run() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
            return [await one(Path(tmp), layout=layout, changed=changed, way=way)
                    for layout, changed in (("block", "every entry"), ("block", "one entry"), ("flow", "every entry"))
                    for way in ("event loop", "file source")]

    return {"services": services, "runs": asyncio.run(run())}


# --------------------------------------------------------------------------- edits seen


def edits(count: int) -> dict[str, Any]:
    """An endpoint file edited `count` times each way (renamed over, rewritten in place): from the edit to
    the catalog's change, in this process (inotify, the poll an hour away: what it sees, inotify told it)."""
    import logging

    import structlog

    from meshplane.discovery import catalog as catalog_mod
    from meshplane.discovery import filesource

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    async def one(way: str, directory: Path) -> dict[str, Any]:
        path = directory / "cluster-1.yaml"
        path.write_text(endpoints(1, 30000))
        catalog = catalog_mod.Catalog()
        changed = asyncio.Event()
        seen: list[float] = []
        catalog.subscribe(lambda change: (seen.append(time.monotonic()), changed.set()))
        source = filesource.FileSource(path, interval=3600)
        await source.start(catalog)
        await asyncio.sleep(0.5)  # past the first look
        took = []
        try:
            for i in range(count):
                changed.clear()
                text = endpoints(1, 30001 + i)
                if way == "renamed over":
                    tmp = directory / ".cluster-1.yaml.tmp"
                    tmp.write_text(text)
                    began = time.monotonic()
                    tmp.replace(path)
                else:
                    began = time.monotonic()
                    path.write_text(text)
                await asyncio.wait_for(changed.wait(), 10)
                took.append(seen[-1] - began)
                await asyncio.sleep(0.02)
        finally:
            await source.stop()
        return {"way": way, "ms": common.latency_summary(took)}

    async def run() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
            return [await one(way, Path(tmp)) for way in ("renamed over", "rewritten in place")]

    return {"edits": count, "ways": asyncio.run(run())}


# --------------------------------------------------------------------------- end to end


class Probe:
    """/healthz every 50 ms from a thread: when each was sent and how long it took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            with urllib.request.urlopen(self.url, timeout=300) as response:
                response.read()
            self.answers.append((sent, time.monotonic() - sent))
            self._stop.wait(0.05)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def applied(http_port: int) -> float:
    samples = common.scrape(f"http://127.0.0.1:{http_port}/metrics")
    return samples.get(("meshplane_policy_reloads_total", (("result", "applied"),)), 0.0)


async def end_to_end(routes: int, services: int, moves: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        workdir = Path(tmp)
        endpoint_file, policy_file = workdir / "cluster-1.yaml", workdir / "policy.yaml"
        common.atomic_write(endpoint_file, endpoints(services, 30000))
        common.atomic_write(policy_file, policy(1, services))
        server = common.Meshplane(workdir, [endpoint_file], policy_file)
        try:
            started = server.wait_ready()
            node = ads_client.node("sidecar", region="r1", zone="z1", cluster="cluster-1")
            async with ads_client.AdsClient(server.target, node) as sidecar:
                await sidecar.request(typeurls.CLUSTER)
                clusters = await sidecar.recv()
                await sidecar.ack(clusters)
                name = next(n for n in ads_client.resource_names(clusters) if "service0." in n)
                await sidecar.request(typeurls.ENDPOINT, [name])
                await sidecar.ack(await sidecar.recv())
                port = 30000

                async def move() -> float:
                    """Move service0's endpoint; seconds until the sidecar is sent the assignment carrying it."""
                    nonlocal port
                    port += 1
                    common.atomic_write(endpoint_file, endpoints(services, port))
                    began = time.monotonic()
                    while True:
                        response = await sidecar.recv(timeout=600)
                        await sidecar.ack(response)
                        got = ads_client.resources(response).get(name)
                        if got is not None and any(lb.endpoint.address.socket_address.port_value == port
                                                   for group in got.endpoints for lb in group.lb_endpoints):
                            return time.monotonic() - began

                baseline = [await move() for _ in range(moves)]
                with Probe(f"http://127.0.0.1:{server.http_port}/healthz") as probe:
                    before = await asyncio.to_thread(applied, server.http_port)

                    async def reloaded() -> float:
                        while await asyncio.to_thread(applied, server.http_port) <= before:
                            await asyncio.sleep(0.05)
                        return time.monotonic()

                    common.atomic_write(policy_file, policy(routes, services))
                    swapped = time.monotonic()
                    done = asyncio.create_task(reloaded())
                    await asyncio.sleep(1.0)
                    moved_at = time.monotonic()
                    during = await move()
                    reload_s = await done - swapped
                healthz = [took for sent, took in probe.answers if swapped <= sent <= swapped + reload_s]
        finally:
            server.stop()
    return {
        "routes": routes, "services": services, "start_s": round(started, 2),
        "reload_s": round(reload_s, 2),
        "move_ms": {"baseline": common.latency_summary(baseline),
                    "during_reload": round(during * 1000, 1), "moved_at_s": round(moved_at - swapped, 2),
                    "before_reload_applied": moved_at + during < swapped + reload_s},
        "healthz_ms": {"answers": len(healthz), **common.latency_summary(healthz)},
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over the runs of what docs/benchmarks.md quotes."""
    return {
        "reload_s": common.spread(r["reload_s"] for r in runs),
        "move_baseline_p50_ms": common.spread(r["move_ms"]["baseline"]["p50"] for r in runs),
        "move_during_reload_ms": common.spread(r["move_ms"]["during_reload"] for r in runs),
        "healthz_p50_ms": common.spread(r["healthz_ms"]["p50"] for r in runs),
        "healthz_max_ms": common.spread(r["healthz_ms"]["max"] for r in runs),
        "every_move_before_the_reload_applied": all(r["move_ms"]["before_reload_applied"] for r in runs),
    }


def print_result(result: dict[str, Any]) -> None:
    if "edits" in result:
        ways = result["edits"]["ways"]
        common.print_table(["edit", "p50 ms", "p99", "max"],
                           [(w["way"], w["ms"]["p50"], w["ms"]["p99"], w["ms"]["max"]) for w in ways],
                           title=f"an endpoint file edited {result['edits']['edits']} times: to the catalog's change")
    if "parsing" in result:
        rows = [(f"{r['layout']}, {r['changed']}", r["way"], r["took_s"], r["ticks"], r["lag_ms"]["p50"],
                 r["lag_ms"]["p99"], r["lag_ms"]["max"]) for r in result["parsing"]["runs"]]
        common.print_table(["edit", "parsed", "took s", "5 ms ticks", "lag p50 ms", "p99", "max"], rows,
                           title=f"an endpoint file of {result['parsing']['services']} services: how long the "
                                 "event loop waited while an edit was parsed")
    if "mechanism" in result:
        rows = [(w["way"], w["validation_s"], w["ticks"], w["lag_ms"]["p50"], w["lag_ms"]["p99"], w["lag_ms"]["max"])
                for w in result["mechanism"]["ways"]]
        common.print_table(["validated", "took s", "5 ms ticks", "lag p50 ms", "p99", "max"], rows,
                           title=f"validating {result['mechanism']['routes']} routes: how long the event loop waited")
        print(f"the worker process: {result['mechanism']['worker']}")
    if "end_to_end" not in result:
        return
    runs = result["end_to_end"]["runs"]
    common.print_table(
        ["routes", "reload s", "move ms (no reload) p50/max", "move ms (1 s into reload)", "healthz ms p50/max", "n"],
        [(e2e["routes"], e2e["reload_s"], f"{e2e['move_ms']['baseline']['p50']}/{e2e['move_ms']['baseline']['max']}",
          e2e["move_ms"]["during_reload"], f"{e2e['healthz_ms']['p50']}/{e2e['healthz_ms']['max']}",
          e2e["healthz_ms"]["answers"]) for e2e in runs],
        title="meshplane serve: an endpoint move and /healthz during a policy reload (one row per run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=5000)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--moves", type=int, default=5, help="baseline endpoint moves (no reload running)")
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end runs, each on a fresh meshplane serve")
    parser.add_argument("--skip-mechanism", action="store_true", help="only the end-to-end part")
    parser.add_argument("--edits-only", action="store_true", help="only the edits (any meshplane's FileSource)")
    parser.add_argument("--parsing-only", action="store_true", help="only the endpoint file parsing")
    parser.add_argument("--mechanism-only", action="store_true", help="only the validation three ways")
    parser.add_argument("--endpoint-services", type=int, default=10_000, help="services of the parsed file")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    common.stop_on_sigterm()
    result: dict[str, Any] = {"machine": common.machine(), "quiet": common.wait_quiet(max_wait=0)}
    if args.parsing_only or not (args.skip_mechanism or args.edits_only or args.mechanism_only):
        print(f"an endpoint file of {args.endpoint_services} services parsed after an edit ...", flush=True)
        result["parsing"] = parsing(args.endpoint_services)
    if args.parsing_only:
        print_result(result)
        print(f"\nwritten to {common.write_results('reload', result, args.out)}")
        return
    if not args.skip_mechanism and not args.mechanism_only:
        print("endpoint file edits, renamed over and rewritten in place ...", flush=True)
        result["edits"] = edits(40)
    if args.mechanism_only or not (args.skip_mechanism or args.edits_only):
        print(f"validating {args.routes} routes three ways ...", flush=True)
        result["mechanism"] = mechanism(args.routes, args.services)
    if args.mechanism_only:
        print_result(result)
        print(f"\nwritten to {common.write_results('reload', result, args.out)}")
        return
    if args.edits_only:
        print_result(result)
        print(f"\nwritten to {common.write_results('reload', result, args.out)}")
        return
    print("meshplane serve: a reload, an endpoint move and /healthz ...", flush=True)
    runs = [asyncio.run(end_to_end(args.routes, args.services, args.moves)) for _ in range(args.repeat)]
    result["end_to_end"] = {"runs": runs, **summary(runs)}
    print_result(result)
    print(f"\nwritten to {common.write_results('reload', result, args.out)}")


if __name__ == "__main__":
    main()
