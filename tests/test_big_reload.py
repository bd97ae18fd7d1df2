"""A big policy reload holds up nothing else: while 3,000 routes are validated, /healthz answers and an
endpoint move is pushed, both before the new policy is applied (ordering, not timing)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncinotify
import pytest

from meshplane import app
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import cluster_doc, wait_for, write_yaml

pytestmark = pytest.mark.slow


def _policy(routes: int) -> str:
    return ("apiVersion: meshplane.io/v2\ngateways:\n  - name: edge\n    listeners:\n"
            "      - {name: http, port: 8080}\nroutes:\n" + "".join(
                f"  - name: r{i}\n    parentRefs: [{{name: edge}}]\n    hostnames: [h{i}.example.com]\n"
                f"    rules:\n      - matches: [{{path: {{type: PathPrefix, value: /p{i}}}}}]\n"
                f"        backendRefs: [{{name: svc, port: 8000}}]\n" for i in range(routes)))


def _meanwhile(directory: Path, *, watching: threading.Event, swapped: threading.Event, move: Any, health: str,
               out: dict[str, float]) -> None:
    """In a thread of its own, as another program would: once meshplane has read the new policy (the file
    closed without a write, after the swap), move the endpoint, then ask /healthz; note when each happened."""
    with asyncinotify.Inotify(sync_timeout=120) as notify:
        notify.add_watch(directory, asyncinotify.Mask.CLOSE_NOWRITE)
        watching.set()
        while True:
            event = notify.sync_get()
            if event is None:
                raise TimeoutError("meshplane never read the new policy")
            if str(event.name) == "policy.yaml" and swapped.is_set():
                break
    out["read"] = time.monotonic()
    move()
    with urllib.request.urlopen(health, timeout=300) as response:
        assert response.status == 200
    out["healthz"] = time.monotonic()


async def test_healthz_and_an_endpoint_move_are_served_while_a_big_policy_is_validated(
        start_plane: Any, tmp_path: Path) -> None:
    endpoints = tmp_path / "c1.yaml"

    def place(port: int) -> None:
        write_yaml(endpoints, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": port}]}))

    place(9001)
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(1))
    old = time.time() - 10  # a stat that old is trusted: the running plane never reads this version again
    os.utime(policy, (old, old))
    plane: app.ControlPlane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)
    applied: list[float] = []
    counted = plane.policy_watcher.on_result

    def on_result(result: str) -> None:
        if result == "applied":
            applied.append(time.monotonic())
        counted(result)

    plane.policy_watcher.on_result = on_result
    arrived: dict[int, float] = {}  # endpoint port -> when a sidecar was sent it
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}",
                                    ads_client.node("sidecar", region="r1", zone="z1", cluster="c1")) as sidecar:
        await sidecar.request(typeurls.CLUSTER)
        clusters = await sidecar.recv()
        await sidecar.ack(clusters)
        await sidecar.request(typeurls.ENDPOINT, ads_client.resource_names(clusters))

        async def record() -> None:
            while True:
                response = await sidecar.recv(timeout=600)
                if response.type_url == typeurls.ENDPOINT:
                    for cla in ads_client.resources(response).values():
                        for group in cla.endpoints:
                            for lb in group.lb_endpoints:
                                arrived.setdefault(lb.endpoint.address.socket_address.port_value, time.monotonic())
                await sidecar.ack(response)

        recording = asyncio.create_task(record())
        try:
            await wait_for(lambda: 9001 in arrived, what="the endpoint as it was")
            watching, swapped, out = threading.Event(), threading.Event(), dict[str, float]()
            thread = asyncio.create_task(asyncio.to_thread(
                _meanwhile, tmp_path, watching=watching, swapped=swapped, move=lambda: place(9002),
                health=f"http://127.0.0.1:{plane.http_port}/healthz", out=out))
            await asyncio.to_thread(watching.wait, 10)
            tmp = tmp_path / "policy.tmp"
            tmp.write_text(_policy(3000))
            tmp.replace(policy)
            swapped.set()
            await thread
            await wait_for(lambda: applied, timeout=300, what="the big policy applied")
            await wait_for(lambda: 9002 in arrived, what="the moved endpoint pushed")
        finally:
            recording.cancel()
            await asyncio.gather(recording, return_exceptions=True)
    assert len(plane.policy_watcher.current.routes) == 3000
    assert out["read"] < out["healthz"] < applied[0], "/healthz waited for the reload"
    assert out["read"] < arrived[9002] < applied[0], "the endpoint move waited for the reload"
