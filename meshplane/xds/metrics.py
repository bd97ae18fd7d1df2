"""Prometheus metrics and logs, hung off the ADS server's callbacks.

Each control plane instance has its own registry, so several can run in one
process (tests, the demo) without their numbers mixing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import meshplane
from meshplane import aio
from meshplane.xds import streams, typeurls

log = structlog.get_logger(__name__)

REFUSALS = (("INVALID_ARGUMENT", "bad_request"), ("INVALID_ARGUMENT", "node_size"), ("PERMISSION_DENIED", "identity"),
            ("RESOURCE_EXHAUSTED", "streams"), ("RESOURCE_EXHAUSTED", "streams_per_peer"),
            ("RESOURCE_EXHAUSTED", "names"), ("RESOURCE_EXHAUSTED", "request_size"),
            ("RESOURCE_EXHAUSTED", "connections"), ("RESOURCE_EXHAUSTED", "connections_per_peer"),
            ("UNAVAILABLE", "certificate"), ("UNAVAILABLE", "handshake"))
"""Every (status, reason) a stream is refused with (meshplane_xds_refused_streams_total)."""

# Milliseconds matter here: the buckets resolve 1-250 ms finely (a p99 interpolated between 100 and
# 250 ms buckets read 239 ms where proxies measured 88), and seconds coarsely.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.09, 0.1, 0.125, 0.15,
                   0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = tuple(float(2 ** n) for n in range(8, 26, 2))  # 256 B .. 16 MiB


class Metrics:
    """Implements streams.Callbacks; also the push loop's, the view cache's and discovery's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        # meshplane_build_info{version} 1: which version each replica runs, e.g. during a rolling upgrade.
        Info("meshplane_build", "The meshplane version running", registry=r).info({"version": meshplane.version()})
        # What every response, request and ACK updates is counted in plain numbers (on the event loop,
        # no locks) and turned into metric families only when scraped: prometheus_client's own took a
        # lock per update, some 14 % of the server's CPU per push at 1,000 proxies.
        self.hot = HotMetrics(registry=r)
        self.nacks = Counter("meshplane_xds_nacks", "NACKs (rejected configs) received", ["type"], registry=r)
        self.stale = Counter(
            "meshplane_xds_stale_nonces", "Requests ignored for a stale nonce", ["type"], registry=r
        )
        self.proxies = Gauge("meshplane_xds_connected_proxies", "Open ADS streams", registry=r)
        self.views = Gauge("meshplane_xds_views", "Distinct views being served", registry=r)
        self.debounce = Histogram(
            "meshplane_push_debounce_seconds",
            "From the first change of a batch to the start of its build",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.build = Histogram(
            "meshplane_push_build_seconds", "Time to rebuild the views of one batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.cluster_synced = Gauge(
            "meshplane_discovery_cluster_synced", "1 once a cluster's source has synced", ["cluster"], registry=r
        )
        self.cluster_stale = Gauge(
            "meshplane_discovery_cluster_stale", "1 while a cluster's endpoints may be out of date",
            ["cluster"], registry=r,
        )
        self.build_errors = Counter(
            "meshplane_build_errors", "Builds of a service's resources that failed (the last good ones stay)",
            ["type"], registry=r,
        )
        self.push_loop_errors = Counter(
            "meshplane_push_loop_errors", "Pushes the push loop could not complete (it carries on)", registry=r,
        )
        self.stalled_writes = Counter(
            "meshplane_xds_stalled_writes",
            "Heavy pushes whose client did not take a response in time: their push slot was given back",
            registry=r,
        )
        self.policy_reloads = Counter(
            "meshplane_policy_reloads",
            "Policy file loads after start-up by result: applied, unchanged (the same policy), rejected",
            ["result"], registry=r,
        )
        self.policy_warnings = Gauge(
            "meshplane_policy_warnings", "Warnings of the policy in force (listed in /ready and by meshplane validate)",
            registry=r,
        )
        self.policy_warnings_repeated = Counter(
            "meshplane_policy_warnings_repeated",
            "Warnings a policy reload found again: logged when they first appeared, counted here since",
            registry=r,
        )
        self.refusals = Counter(
            "meshplane_xds_refused_streams",
            "Streams ended by meshplane, by gRPC status and reason: a bad request or an oversized node "
            "(INVALID_ARGUMENT), an identity that may not be the proxy it claims (PERMISSION_DENIED), a limit "
            "reached (RESOURCE_EXHAUSTED; connections and connections_per_peer: TLS connections, closed before "
            "their handshake), a client certificate not accepted or a TLS handshake that failed (UNAVAILABLE; "
            "certificate, handshake). Connections and handshakes with --client-cert optional only, where "
            "meshplane does the TLS",
            ["code", "reason"], registry=r,
        )
        self.tls_reloads = Counter(
            "meshplane_tls_reloads",
            "Changes of the ADS port's certificate, key or client CA files by result: applied, rejected (they "
            "cannot be used: the previous ones stay served)",
            ["result"], registry=r,
        )
        self.tls_expiry = Gauge(
            "meshplane_tls_certificate_expiry_timestamp_seconds",
            "When the ADS port's certificate being served expires (Unix time); only with TLS", ["cert"], registry=r,
        )
        self.clients = Gauge(
            "meshplane_xds_clients", "Connected clients by kind and sync state (the worst of their types)",
            ["kind", "state"], registry=r,
        )
        TaskErrors(registry=r)
        # Every child a dashboard reads exists from the start, at 0: a counter series that first
        # appears at 1 shows no increase() in Prometheus, so a first NACK would go unseen.
        for short in typeurls.SHORT_NAMES.values():
            for family in (self.nacks, self.stale, self.build_errors):
                family.labels(short)
        for result in ("applied", "unchanged", "rejected"):
            self.policy_reloads.labels(result)
        for result in ("applied", "rejected"):
            self.tls_reloads.labels(result)
        for code, reason in REFUSALS:
            self.refusals.labels(code, reason)

    def policy_warned(self, in_force: int, repeated: int) -> None:
        """A policy was accepted with `in_force` warnings, `repeated` of them already there before."""
        self.policy_warnings.set(in_force)
        self.policy_warnings_repeated.inc(repeated)

    # streams.Callbacks

    def stream_opened(self, stream: streams.Stream) -> None:
        self.proxies.inc()
        log.info("proxy connected", node=stream.node_id, peer=stream.peer,
                 view=str(stream.watch.key) if stream.watch else "")

    def stream_closed(self, stream: streams.Stream) -> None:
        self.proxies.dec()
        log.info("proxy disconnected", node=stream.node_id, peer=stream.peer)

    def response_sent(self, stream: streams.Stream, type_url: str, *, resources: int, size: int) -> None:
        hot = self.hot
        hot.responses[type_url] += 1
        hot.response_bytes[type_url] += size
        hot.response_size[type_url].observe(size)

    def request_received(self, stream: streams.Stream, type_url: str) -> None:
        self.hot.requests[type_url] += 1

    def push_started(self, stream: streams.Stream, queued: float) -> None:
        self.hot.queue.observe(queued)

    def acked(self, stream: streams.Stream, type_url: str, *, latency: float | None) -> None:
        self.hot.acks[type_url] += 1
        if latency is not None:
            self.hot.push_latency[type_url].observe(latency)

    def nacked(self, stream: streams.Stream, type_url: str, *, version: str, detail: str) -> None:
        self.nacks.labels(typeurls.SHORT_NAMES[type_url]).inc()
        log.warning("proxy rejected config (NACK); it keeps its last good version",
                    node=stream.node_id, type=typeurls.SHORT_NAMES[type_url], kept_version=version, detail=detail)

    def count_clients(self, registry: streams.Registry) -> None:
        """Set the clients gauge from the open streams (at scrape time)."""
        counts: dict[tuple[str, str], int] = {}
        for stream in registry:
            if stream.proxy is None:
                continue
            key = (stream.proxy.kind.value, stream.worst().value)
            counts[key] = counts.get(key, 0) + 1
        self.clients.clear()
        for (kind, state), n in counts.items():
            self.clients.labels(kind, state).set(n)

    def refused(self, stream: streams.Stream | None, code: str, reason: str) -> None:
        self.refusals.labels(code, reason).inc()

    def stale_nonce(self, stream: streams.Stream, type_url: str) -> None:
        self.stale.labels(typeurls.SHORT_NAMES[type_url]).inc()

    def write_stalled(self, stream: streams.Stream) -> None:
        self.stalled_writes.inc()

    def tls_reloaded(self, result: str) -> None:
        self.tls_reloads.labels(result).inc()

    def build_failed(self, type_url: str) -> None:
        self.build_errors.labels(typeurls.SHORT_NAMES.get(type_url, type_url)).inc()


class HotHistogram:
    """A histogram updated with no lock (from the event loop only), read at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]  # as prometheus_client writes `le`
        return out


class TaskErrors(Collector):
    """meshplane_task_errors_total{task}: failures the long-lived tasks logged and carried on from (aio.failed),
    counted per process: the tasks that watch files and clusters know no control plane's metrics."""

    TASKS = ("policy-watcher", "endpoint-file", "kube-orphans")
    """Each at 0 from the start (a counter that first appears at 1 shows no increase() in Prometheus)."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily(
            "meshplane_task_errors", "Failures a long-lived task (a file or cluster watcher) logged and carried on "
            "from: each is a bug of meshplane's, logged with its traceback", labels=["task"])
        for task, count in {**dict.fromkeys(self.TASKS, 0), **aio.task_errors()}.items():
            counter.add_metric([task], count)
        yield counter


class HotMetrics(Collector):
    """The metrics every response, request and ACK updates: counted in plain numbers per type URL,
    exposed as the metric families they always were (names, labels and buckets unchanged)."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        types = typeurls.SHORT_NAMES
        self.responses = dict.fromkeys(types, 0)
        self.response_bytes = dict.fromkeys(types, 0)
        self.acks = dict.fromkeys(types, 0)
        self.requests = dict.fromkeys(types, 0)
        self.push_latency = {t: HotHistogram(LATENCY_BUCKETS) for t in types}
        self.response_size = {t: HotHistogram(SIZE_BUCKETS) for t in types}
        self.queue = HotHistogram(LATENCY_BUCKETS)
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        short = typeurls.SHORT_NAMES
        for name, doc, values in (
            ("meshplane_xds_responses", "DiscoveryResponses sent", self.responses),
            ("meshplane_xds_response_bytes", "Bytes of DiscoveryResponses sent", self.response_bytes),
            ("meshplane_xds_acks", "ACKs received", self.acks),
            ("meshplane_xds_requests", "DiscoveryRequests received", self.requests),
        ):
            counter = CounterMetricFamily(name, doc, labels=["type"])
            for type_url, value in values.items():
                counter.add_metric([short[type_url]], value)
            yield counter
        for name, doc, hists in (
            ("meshplane_push_latency_seconds",
             "From a watcher or the policy loader seeing a change to a proxy ACKing the version carrying it",
             self.push_latency),
            ("meshplane_xds_response_size_bytes", "Size of each DiscoveryResponse sent (configuration size)",
             self.response_size),
        ):
            family = HistogramMetricFamily(name, doc, labels=["type"])
            for type_url, hist in hists.items():
                family.add_metric([short[type_url]], hist.buckets(), hist.sum)
            yield family
        queue = HistogramMetricFamily(
            "meshplane_push_queue_seconds",
            "From a stream's view changing (or its request arriving) to the push that carries it being composed")
        queue.add_metric([], self.queue.buckets(), self.queue.sum)
        yield queue
