"""The metrics a dashboard reads, as /metrics serves them: reload results, requests, sizes, queue time,
clients by kind and sync state, and /debug/syncz's view of the same streams."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshplane import app
from meshplane.xds import client as ads_client
from meshplane.xds import metrics, typeurls
from tests.conftest import cluster_doc, wait_for, write_yaml

POLICY = "apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: {timeout}\n"


def _scrape(plane: app.ControlPlane, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{plane.http_port}{path}", timeout=5) as response:
        return str(response.read().decode())


async def samples(plane: app.ControlPlane) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = await asyncio.to_thread(_scrape, plane)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return table.get((name, frozenset(labels.items())), 0.0)


async def test_policy_reloads_count_applied_unchanged_and_rejected(start_plane: Any, tmp_path: Path) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001}]}))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(timeout="1s"))
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)

    async def reloads(result: str) -> float:
        return value(await samples(plane), "meshplane_policy_reloads_total", result=result)

    policy.write_text(POLICY.format(timeout="2s"))
    await wait_for(lambda: reloads("applied"), what="an applied reload counted")
    policy.write_text("# the same policy, said again\n" + POLICY.format(timeout="2s"))
    await wait_for(lambda: reloads("unchanged"), what="an unchanged reload counted")
    policy.write_text(POLICY.format(timeout="soon"))
    await wait_for(lambda: reloads("rejected"), what="a rejected reload counted")
    assert await reloads("applied") == 1


async def test_requests_sizes_queue_and_clients_by_state(start_plane: Any, tmp_path: Path) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001}]}))
    plane = await start_plane(endpoint_files=(endpoints,))
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        await c.request(typeurls.CLUSTER)
        cds = await c.recv()
        table = await samples(plane)
        # Sent, not ACKed yet: STALE.
        assert value(table, "meshplane_xds_clients", kind="sidecar", state="STALE") == 1
        assert value(table, "meshplane_xds_requests_total", type="cds") == 1
        assert value(table, "meshplane_xds_response_size_bytes_count", type="cds") == 1
        assert value(table, "meshplane_xds_response_size_bytes_sum", type="cds") == \
            value(table, "meshplane_xds_response_bytes_total", type="cds") > 0
        await c.ack(cds)
        await wait_for(lambda: _state(plane, "sidecar-1") == "SYNCED", what="the ACK recorded")
        table = await samples(plane)
        assert value(table, "meshplane_xds_clients", kind="sidecar", state="SYNCED") == 1
        assert value(table, "meshplane_xds_clients", kind="sidecar", state="STALE") == 0

        # A change: queued for this stream, pushed, and the push's queue time observed.
        write_yaml(endpoints, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001}],
                                                       "other": [{"zone": "z1", "port": 9002}]}))
        update = await c.recv()
        await c.nack(update, kept_version=cds.version_info, message="rejected on purpose")
        await wait_for(lambda: _state(plane, "sidecar-1") == "NACKED", what="the NACK recorded")
        table = await samples(plane)
        assert value(table, "meshplane_push_queue_seconds_count") >= 1
        assert value(table, "meshplane_xds_clients", kind="sidecar", state="NACKED") == 1
        assert value(table, "meshplane_xds_nacks_total", type="cds") == 1
        syncz = json.loads(await asyncio.to_thread(_scrape, plane, "/debug/syncz"))
        (entry,) = syncz["clients"]
        assert entry["types"]["cds"]["last_nack"]["message"] == "rejected on purpose"
        assert entry["types"]["cds"]["last_nack"]["rejected"] == update.version_info
        assert entry["types"]["cds"]["last_nack"]["kept"] == cds.version_info
    await wait_for(lambda: not len(plane.streams), what="the stream closed")
    table = await samples(plane)
    assert not any(name == "meshplane_xds_clients" and v for (name, _), v in table.items())


def _state(plane: app.ControlPlane, node: str) -> str | None:
    return next((s.worst().value for s in plane.streams if s.proxy is not None and s.proxy.id == node), None)


def test_latency_buckets_resolve_milliseconds() -> None:
    # Between 1 and 250 ms no bucket is wider than 25 % of its upper bound plus 10 ms: a p99 of
    # 88 ms reads as 88 +- a few, not 239 (issue 9's benchmark, interpolated between 100 and 250).
    fine = [b for b in metrics.LATENCY_BUCKETS if b <= 0.25]
    assert fine[0] == 0.001 and fine[-1] == 0.25
    for low, high in itertools.pairwise(fine):
        assert high - low <= 0.25 * high + 0.010, (low, high)


async def test_the_policy_warnings_are_in_ready_and_counted_and_a_rejected_edit_too(
        start_plane: Any, tmp_path: Path) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001}]}))
    policy = tmp_path / "policy.yaml"
    text = ("apiVersion: meshplane.io/v2\ngateways: [{name: edge, listeners: [{name: http, port: 8080}]}]\n"
            "routes:\n  - name: r\n    parentRefs: [{name: edge}]\n    rules:\n"
            "      - backendRefs: [{name: svc, port: 8000}, {name: nosuch, port: 8000}]\n")
    policy.write_text(text)
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)

    async def ready_body() -> dict[str, Any]:
        def get() -> dict[str, Any]:
            return dict(json.loads(_scrape(plane, "/ready")))
        return await asyncio.to_thread(get)

    async def reloads(result: str) -> float:
        return value(await samples(plane), "meshplane_policy_reloads_total", result=result)

    # At start-up nothing is known yet (no warnings); edited once the plane is ready, the unknown backend is.
    policy.write_text(text + "# edited\n")
    await wait_for(lambda: reloads("unchanged"), what="the edit reloaded")
    warning = f"{policy}:7: routes[0].rules[0].backendRefs[1].name: no source knows service default/nosuch yet"
    assert (await ready_body())["policy"] == {"warnings": [warning], "errors": []}
    table = await samples(plane)
    assert value(table, "meshplane_policy_warnings") == 1
    assert value(table, "meshplane_policy_warnings_repeated_total") == 0

    async def repeated() -> float:
        return value(await samples(plane), "meshplane_policy_warnings_repeated_total")

    policy.write_text(text + "# edited again\n")  # the same warning again: counted, not logged
    await wait_for(lambda: repeated(), what="the warning found again counted")
    assert await reloads("unchanged") == 2

    policy.write_text(text.replace("port: 8000}]", "port: 0}]"))  # rejected: the last good stays, with its warning
    await wait_for(lambda: reloads("rejected"), what="the broken edit rejected")
    body = await ready_body()
    assert body["policy"]["warnings"] == [warning]
    assert [e.split(": ", 2)[:2] for e in body["policy"]["errors"]] == [
        [f"{policy}:7", "routes[0].rules[0].backendRefs[1].port"]]
