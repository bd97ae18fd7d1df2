"""The meshplane Grafana dashboard, as code (grafana-foundation-sdk). Regenerate the committed JSON with

    .venv/bin/python deploy/grafana/dashboard.py

(tests/test_dashboard.py fails while deploy/grafana/dashboards/meshplane.json differs from what this
prints). Each panel says what it tells an operator (docs/operating.md lists them) and the situation
in which it has data: tests/test_dashboard_prometheus.py runs every query against a real Prometheus
scraping a running meshplane with real Envoys, in that situation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, SortOrder, TooltipDisplayMode
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh
except ModuleNotFoundError as exc:  # the README's venv has `.[envoy]` only: say how to get it, in one line
    if exc.name is None or not exc.name.startswith("grafana_foundation_sdk"):
        raise
    sys.exit("deploy/grafana/dashboard.py needs grafana-foundation-sdk, one of the test dependencies: "
             ".venv/bin/pip install -e '.[test]'")

OUT = Path(__file__).resolve().parent / "dashboards" / "meshplane.json"
UID = "meshplane"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# Every query reads the jobs and instances chosen at the top. Both lists hold only what exports meshplane's
# metrics; "All" jobs is that list (Grafana's regex of its values), "All" instances any of those jobs'.
ON = '{job=~"$job", instance=~"$instance"}'
# process_* metrics are every exporter's: keep the series of processes that are meshplane, whatever else a
# job scrapes (a `kubernetes-pods` job scrapes every annotated pod under one job name).
MESHPLANE_ONLY = f"and on (job, instance) meshplane_xds_connected_proxies{ON}"


@dataclass(frozen=True)
class Query:
    """`nonzero`: in its panel's situation some series is above zero (not only present)."""

    expr: str
    legend: str
    nonzero: bool = False


@dataclass(frozen=True)
class PanelSpec:
    """A time series panel. `shows`: the situation its queries have data in: "serving" (proxies
    connected), "change" (an endpoint change pushed and ACKed), "nack", "stale" (a cluster's API
    server unreachable), "rejected" (a broken policy edit), "build-failure"."""

    row: str
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    shows: str


def _quantiles(metric: str, by: str, label: str) -> tuple[Query, ...]:
    group = f"le, {by}" if by else "le"
    return tuple(
        Query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{ON}[{RATE}])))",
              f"p{int(q * 100)} {label}")
        for q in (0.5, 0.99)
    )


PANELS: tuple[PanelSpec, ...] = (
    PanelSpec(
        "Pushes", "Push latency: change seen to proxy ACK, p50 and p99 by type",
        "From a watcher or the policy loader seeing a change to a proxy ACKing the version that carries it. "
        "The number to watch during a failover.",
        "s", _quantiles("meshplane_push_latency_seconds", "type", "{{type}}"), "change"),
    PanelSpec(
        "Pushes", "Responses sent by type",
        "DiscoveryResponses written per second: pushes after changes, and answers to (re)connecting proxies.",
        "ops", (Query(f"sum by (type) (rate(meshplane_xds_responses_total{ON}[{RATE}]))", "{{type}}"),), "serving"),
    PanelSpec(
        "Pushes", "NACKs by type",
        "Configurations a proxy rejected (it keeps its last good one). Any is a bug or a policy Envoy cannot "
        "take: `meshplane status --state NACKED` names the proxy and Envoy's message.",
        "short", (Query(f"sum by (type) (increase(meshplane_xds_nacks_total{ON}[{RATE}]))", "{{type}}", True),),
        "nack"),
    PanelSpec(
        "Pushes", "Debounce, queue and build time, p99",
        "Where push latency goes inside meshplane: waiting for a burst of changes to end (debounce), "
        "rebuilding the views (build), and a stream waiting for its turn to write (queue).",
        "s", (
            Query(f"histogram_quantile(0.99, sum by (le) (rate(meshplane_push_debounce_seconds_bucket{ON}[{RATE}])))",
                  "debounce"),
            Query(f"histogram_quantile(0.99, sum by (le) (rate(meshplane_push_build_seconds_bucket{ON}[{RATE}])))",
                  "build"),
            Query(f"histogram_quantile(0.99, sum by (le) (rate(meshplane_push_queue_seconds_bucket{ON}[{RATE}])))",
                  "queue"),
        ), "change"),
    PanelSpec(
        "Pushes", "Configuration size per response, p50 and p99 by type",
        "Bytes of each DiscoveryResponse: what a push costs the network and the proxy.",
        "bytes", _quantiles("meshplane_xds_response_size_bytes", "type", "{{type}}"), "change"),
    PanelSpec(
        "Pushes", "xDS requests by type",
        "DiscoveryRequests received per second (ACKs, NACKs, subscriptions). A storm here with no changes "
        "means proxies reconnecting.",
        "reqps", (Query(f"sum by (type) (rate(meshplane_xds_requests_total{ON}[{RATE}]))", "{{type}}"),), "serving"),
    PanelSpec(
        "Clients", "Clients by kind and sync state",
        "Connected proxies by kind (sidecar, gateway) and the worst state of their types: SYNCED, STALE (sent, "
        "not ACKed yet), NACKED, NOT SENT. STALE that does not clear is a stuck proxy.",
        "short", (Query(f"sum by (kind, state) (meshplane_xds_clients{ON})", "{{kind}} {{state}}"),), "serving"),
    PanelSpec(
        "Clients", "Open ADS streams",
        "Streams open to this instance, and the distinct views (locality, kind, listener) they are served from.",
        "short", (Query(f"sum(meshplane_xds_connected_proxies{ON})", "streams"),
                  Query(f"sum(meshplane_xds_views{ON})", "views")), "serving"),
    PanelSpec(
        "Discovery and policy", "Discovery: clusters synced and stale",
        "Per Kubernetes cluster (or endpoint file): synced once listed; stale while its API server cannot be "
        "reached, its endpoints kept as last seen.",
        "short", (Query(f"max by (cluster) (meshplane_discovery_cluster_synced{ON})", "{{cluster}} synced"),
                  Query(f"max by (cluster) (meshplane_discovery_cluster_stale{ON})", "{{cluster}} stale", True)),
        "stale"),
    PanelSpec(
        "Discovery and policy", "Policy reloads by result",
        "Edits of the policy file: applied, unchanged (the same policy), rejected (the old one stays; the log "
        "and `meshplane validate` say why).",
        "short", (Query(f"sum by (result) (increase(meshplane_policy_reloads_total{ON}[{RATE}]))", "{{result}}",
                        True),),
        "rejected"),
    PanelSpec(
        "Discovery and policy", "Build failures",
        "Builds of a service's resources that failed (meshplane keeps serving the last good ones; /ready lists "
        "them), and pushes the push loop could not complete. Any is a meshplane bug.",
        "short", (Query(f"sum by (type) (increase(meshplane_build_errors_total{ON}[{RATE}]))", "build {{type}}",
                        True),
                  Query(f"sum(increase(meshplane_push_loop_errors_total{ON}[{RATE}]))", "push loop")),
        "build-failure"),
    PanelSpec(
        "Process", "CPU",
        "CPU time per second of the meshplane process (1 = one core).",
        "percentunit", (Query(f"rate(process_cpu_seconds_total{ON}[{RATE}]) {MESHPLANE_ONLY}", "{{instance}}"),),
        "serving"),
    PanelSpec(
        "Process", "Memory",
        "Resident memory of the meshplane process.",
        "bytes", (Query(f"process_resident_memory_bytes{ON} {MESHPLANE_ONLY}", "{{instance}}"),), "serving"),
)


def build() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("meshplane")
        .uid(UID)
        .tags(["meshplane", "xds", "envoy"])
        .refresh("10s")
        .time("now-30m", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("job").label("job").datasource(DATASOURCE)
            .query("label_values(meshplane_xds_connected_proxies, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True).include_all(True)  # no custom "All": the regex of the jobs found, never `.*`
        )
        .with_variable(
            dashboard.QueryVariable("instance").label("instance").datasource(DATASOURCE)
            .query('label_values(meshplane_xds_connected_proxies{job=~"$job"}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True).include_all(True).all_value(".*")
        )
    )
    row = None
    ids = iter(range(1, 100))
    for spec in PANELS:
        if spec.row != row:
            row = spec.row
            board = board.with_row(dashboard.Row(row).id(next(ids)))
        panel = (
            timeseries.Panel().id(next(ids)).title(spec.title).description(spec.description).unit(spec.unit)
            .datasource(DATASOURCE).min(0).height(8).span(12)
            .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.TABLE)
                    .placement(LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "max"]))
            .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
        )
        for i, query in enumerate(spec.queries):
            panel = panel.with_target(
                prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(ord("A") + i)))
        board = board.with_panel(panel)
    return board


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == render() else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
