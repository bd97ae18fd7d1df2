"""The operator's commands against a running control plane with real Envoys (S6): `meshplane status`
(and /debug/syncz) with a NACK forced, `--wait-synced` on a rollout, `meshplane config-dump` against
Envoy's own, and `meshplane explain --down` against where the real Envoys then send requests."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshplane import app
from meshplane.demo import envoy, topology
from meshplane.demo import mesh as mesh_mod
from meshplane.demo.ports import free_port
from tests.conftest import cluster_doc, wait_for, write_yaml

pytestmark = pytest.mark.envoy


async def meshplane(*args: str) -> tuple[int, str, str]:
    """Run the `meshplane` command as a user would; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _get(plane: app.ControlPlane, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{plane.http_port}{path}", timeout=5) as response:
        return json.loads(response.read())


async def http(plane: app.ControlPlane, path: str) -> Any:
    return await asyncio.to_thread(_get, plane, path)


def _node(node_id: str, zone: str, **metadata: Any) -> envoy.EnvoyNode:
    return envoy.EnvoyNode(id=node_id, cluster="test", region="r1", zone=zone, sub_zone="c1", metadata=metadata)


async def _eds_ports(proxy: envoy.EnvoyProcess) -> set[int]:
    dump = await proxy.config_dump()
    eds = next(c for c in dump["configs"] if c["@type"].endswith(".EndpointsConfigDump"))
    return {lb["endpoint"]["address"]["socket_address"]["port_value"]
            for c in eds.get("dynamic_endpoint_configs", []) for group in c["endpoint_config"].get("endpoints", [])
            for lb in group.get("lb_endpoints", [])}


async def test_status_shows_a_nack_with_envoys_message_and_wait_synced_waits_for_every_ack(
    start_plane: Any, tmp_path: Path, xds_protocol: str
) -> None:
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    plane = await start_plane(endpoint_files=(path,))
    server = f"http://127.0.0.1:{plane.http_port}"
    good = [envoy.EnvoyProcess(node=_node(f"sidecar-{z}", z, listener_port=free_port(), listener_address="127.0.0.1"),
                               ads_port=plane.ads_port, workdir=tmp_path) for z in ("z1", "z2")]
    with socket.socket() as taken:  # the port the third one's listener asks for is already bound
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        stuck = envoy.EnvoyProcess(
            node=_node("sidecar-stuck", "z1", listener_port=taken.getsockname()[1], listener_address="127.0.0.1"),
            ads_port=plane.ads_port, workdir=tmp_path)
        try:
            for proxy in good:
                await proxy.start()

            # A rollout: a new endpoint; `--wait-synced` returns 0 only once both Envoys ACKed it,
            # so they hold it the moment it returns.
            async def both_synced() -> bool:
                clients = (await http(plane, "/debug/syncz"))["clients"]
                return len(clients) == 2 and all(c["state"] == "SYNCED" for c in clients)

            async def endpoint_seen() -> bool:
                return len((await http(plane, "/debug/placements?service=svc"))["placements"]) == 2

            await wait_for(both_synced, what="both Envoys synced")
            write_yaml(path, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009},
                                                              {"zone": "z2", "port": 9010}]}))
            await wait_for(endpoint_seen, what="the control plane seeing the new endpoint")
            code, out, err = await meshplane("status", "--server", server, "--wait-synced", "10")
            assert code == 0, (out, err)
            for proxy in good:
                assert 9010 in await _eds_ports(proxy), f"{proxy.node.id} did not hold the new endpoint"
            assert out.splitlines()[0] == f"meshplane {importlib.metadata.version('meshplane')} at {server}", out
            assert [ln.split()[0] for ln in out.splitlines()[2:]] == ["sidecar-z1", "sidecar-z2"], out
            assert all(ln.split()[4:8] == ["SYNCED"] * 4 for ln in out.splitlines()[2:]), out

            # A third Envoy cannot bind its listener and NACKs it.
            await stuck.start()
            async def nacked() -> bool:
                syncz = await http(plane, "/debug/syncz")
                return any(c["node"] == "sidecar-stuck" and c["state"] == "NACKED" for c in syncz["clients"])

            await wait_for(nacked, what="the NACK in /debug/syncz")
            stats = await stuck.stats()
            assert stats["listener_manager.lds.update_rejected"] >= 1
            syncz = await http(plane, "/debug/syncz")
            assert {c["protocol"] for c in syncz["clients"]} == {xds_protocol}  # the Envoys speak what they say
            entry = next(c for c in syncz["clients"] if c["node"] == "sidecar-stuck")
            assert entry["state"] == "NACKED"
            nack = entry["types"]["lds"]
            assert nack["state"] == "NACKED" and nack["last_nack"]["rejected"] == nack["sent"]
            assert "Address already in use" in nack["last_nack"]["message"], nack
            assert entry["types"]["cds"]["state"] == "SYNCED"

            code, out, err = await meshplane("status", "--server", server)
            assert code == 0, err
            row = next(ln for ln in out.splitlines() if ln.startswith("sidecar-stuck"))
            expected = ["sidecar", xds_protocol, "r1/z1/c1", "SYNCED", "SYNCED", "NACKED", "SYNCED"]
            assert row.split()[1:8] == expected, out
            assert f"lds NACKED version {nack['sent']}" in out and "Address already in use" in out, out

            for state in ("NACKED", "nacked"):
                code, out, _ = await meshplane("status", "--server", server, "--state", state)
                assert [ln.split()[0] for ln in out.splitlines()[2:] if not ln.startswith(" ")] == ["sidecar-stuck"]
            code, out, _ = await meshplane("status", "--server", server, "--locality", "r1/z2", "--json")
            assert [c["node"] for c in json.loads(out)] == ["sidecar-z2"]

            # One Envoy stuck: a script waiting on the rollout hears so, with its name.
            code, out, err = await meshplane("status", "--server", server, "--wait-synced", "1")
            assert code == 1, out
            assert "1 of 3 clients not SYNCED after 1s: sidecar-stuck" in err

            # config-dump: what was sent, as Envoy's own reads; the clusters are what the Envoy holds.
            code, out, _ = await meshplane("config-dump", "sidecar-z1", "--server", server)
            ours = json.loads(out)
            theirs = await good[0].config_dump()

            def clusters(dump: dict[str, Any]) -> tuple[str, set[str]]:
                section = next(c for c in dump["configs"] if c["@type"].endswith(".ClustersConfigDump"))
                names = {c["cluster"]["name"] for c in section["dynamic_active_clusters"]}
                return section.get("acked_version", section["version_info"]), names

            assert clusters(ours) == clusters(theirs)
            code, out, _ = await meshplane("config-dump", "sidecar-stuck", "--server", server)
            listeners = next(c for c in json.loads(out)["configs"] if c["@type"].endswith(".ListenersConfigDump"))
            assert listeners["state"] == "NACKED" and "Address already in use" in listeners["last_nack"]["message"]
            code, _, err = await meshplane("config-dump", "sidecar-nobody", "--server", server)
            assert code == 1, err
            assert err == ("meshplane config-dump: no client with node id 'sidecar-nobody' is connected; "
                           "connected: sidecar-stuck, sidecar-z1, sidecar-z2\n")
        finally:
            for proxy in (*good, stuck):
                await proxy.stop()


async def test_status_cannot_reach_the_server_says_so() -> None:
    code, _, err = await meshplane("status", "--server", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "meshplane status: no control plane answers at http://127.0.0.1:" in err


@pytest.fixture
async def s1_with_gateway(tmp_path: Path) -> AsyncIterator[mesh_mod.Mesh]:
    gateway_port = free_port()
    policy = topology.demo_policy(gateway_port=gateway_port, base_ejection="5m")
    async with mesh_mod.Mesh(tmp_path, policy=policy, gateway_port=gateway_port) as mesh:
        yield mesh


async def _explain(mesh: mesh_mod.Mesh, *args: str) -> dict[str, Any]:
    assert mesh.plane is not None
    code, out, err = await meshplane("explain", *args, "--json", "--server", f"http://127.0.0.1:{mesh.plane.http_port}")
    assert code == 0, err
    answer: dict[str, Any] = json.loads(out)
    return answer


def _zones_taking_traffic(table: dict[str, Any]) -> set[str]:
    taking = {t["priority"] for t in table["traffic"]}
    return {p["locality"].split("/")[1] for p in table["placements"] if p["priority"] in taking}


@pytest.mark.slow
async def test_explain_down_names_where_the_real_envoys_then_send(s1_with_gateway: mesh_mod.Mesh) -> None:
    mesh = s1_with_gateway
    origin = "ap-northeast-1/ap-northeast-1a/cluster-2"
    now = await _explain(mesh, "mockb", "--from", origin)
    assert _zones_taking_traffic(now) == {"ap-northeast-1a"}
    assert now["placements"][0]["reason"] == "same region, zone and cluster"

    # What if ap-northeast-1a fails? Then break it, and the Envoy in 1a sends where explain said.
    zone_down = await _explain(mesh, "mockb", "--from", origin, "--down", "zone=ap-northeast-1a")
    expected = _zones_taking_traffic(zone_down)
    assert expected == {"ap-northeast-1b"}
    await mesh.break_replica("mockb", "ap-northeast-1a")
    await wait_for(lambda: _mockb_in(mesh, expected), timeout=10, what=f"mockb reached in {expected}")
    for _ in range(6):
        trace = await mesh.request("ap-northeast-1a")
        assert trace.ok and trace.zone_of("mockb") in expected, trace

    # And the whole region (zone given alone: its region comes from the catalog).
    region_down = await _explain(mesh, "mockb", "--from", "ap-northeast-1a", "--down", "region=ap-northeast-1")
    expected = _zones_taking_traffic(region_down)
    assert expected == {"cn-hangzhou-h", "cn-hangzhou-k"}
    await mesh.break_replica("mockb", "ap-northeast-1b")
    await wait_for(lambda: _mockb_in(mesh, expected), timeout=10, what=f"mockb reached in {expected}")
    for _ in range(6):
        trace = await mesh.request("ap-northeast-1a")
        assert trace.ok and trace.zone_of("mockb") in expected, trace

    # At the gateway: the active-standby route, with cluster-1 supposed down, goes to cluster-2;
    # break every mocka in cluster-1 and the gateway's requests land there.
    standby = await _explain(mesh, "--gateway", "edge", "--host", "example.com", "--path", "/standby",
                             "--down", "cluster=cluster-1")
    assert standby["matched"]["rule"] == 2
    (backend,) = standby["backends"]
    expected = _zones_taking_traffic(backend)
    assert expected == {"ap-northeast-1a", "ap-northeast-1b"}
    canary = await _explain(mesh, "--gateway", "edge", "--host", "example.com", "--path", "/mocka",
                            "--header", "canary=cluster-2")
    assert canary["matched"]["rule"] == 1
    for zone in ("cn-hangzhou-h", "cn-hangzhou-k"):
        await mesh.break_replica("mocka", zone)

    async def standby_in_cluster_2() -> bool:
        trace = await mesh.gateway_request("/standby")
        return trace.ok and trace.zone_of("mocka") in expected

    await wait_for(standby_in_cluster_2, timeout=10, what="the gateway's /standby reaching cluster-2")
    for _ in range(6):
        trace = await mesh.gateway_request("/standby")
        assert trace.ok and trace.zone_of("mocka") in expected, trace


async def _mockb_in(mesh: mesh_mod.Mesh, zones: set[str]) -> bool:
    trace = await mesh.request("ap-northeast-1a")
    return trace.ok and trace.zone_of("mockb") in zones


async def test_explain_refuses_what_it_cannot_answer(s1_with_gateway: mesh_mod.Mesh) -> None:
    assert s1_with_gateway.plane is not None
    server = f"http://127.0.0.1:{s1_with_gateway.plane.http_port}"
    code, _, err = await meshplane("explain", "mockb", "--from", "nowhere-1a", "--server", server)
    assert code == 1 and "zone 'nowhere-1a' alone does not say the region" in err
    code, _, err = await meshplane("explain", "mockb", "--from", "ap-northeast-1a", "--down", "dc=1",
                                   "--server", server)
    assert code == 2 and "write zone=Z, cluster=C, region=R or endpoint=ADDR" in err
    code, _, err = await meshplane("explain", "--server", server)
    assert code == 2 and "give a SERVICE, or --gateway NAME" in err
    code, out, _ = await meshplane("explain", "mockb", "--from", "ap-northeast-1a", "--server", server)
    assert code == 0
    assert out.splitlines()[0] == "default/mockb from ap-northeast-1/ap-northeast-1a/cluster-2"
    assert "traffic: 100% to priority 0" in out
