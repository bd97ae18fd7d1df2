"""A bug while building one service's resources never stops the control plane (docs/architecture.md,
invariant 7): the service keeps its last good resources, everything else is still pushed, and the
failure is logged once, counted and shown in /ready's body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from meshplane import app
from meshplane.demo import backend
from meshplane.xds import client as ads_client
from meshplane.xds import translate, typeurls
from tests.conftest import cluster_doc, wait_for, write_yaml

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"
MOCKB_9000 = "outbound|9000||mockb.default.svc.cluster.local"
MOCKC = "outbound|8000||mockc.default.svc.cluster.local"
MOCKD = "outbound|8000||mockd.default.svc.cluster.local"


def _doc(*, mockb_port: int = 8000, mockb_target: int = 9001, mockd: bool = False) -> dict[str, Any]:
    services = {"mockb": [{"zone": "z1", "port": mockb_target}], "mockc": [{"zone": "z1", "port": 9002}]}
    if mockd:
        services["mockd"] = [{"zone": "z1", "port": 9003}]
    doc = cluster_doc("c1", "r1", services)
    doc["services"][0]["ports"][0]["port"] = mockb_port
    return doc


async def _ready(plane: app.ControlPlane) -> tuple[int, dict[str, Any]]:
    status, body = await backend.http_get(plane.http_port, "localhost", "/ready")
    return status, dict(json.loads(body))


def _errors_counted(plane: app.ControlPlane) -> float:
    return plane.metrics.registry.get_sample_value("meshplane_build_errors_total", {"type": "cds"}) or 0.0


async def test_a_failing_build_keeps_the_service_on_its_last_good_resources_and_pushes_the_rest(
    start_plane: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", _doc())
    plane = await start_plane(endpoint_files=(endpoints,))
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    build_cluster = translate.build_cluster

    def broken(service: Any, port: Any, policy: Any) -> Any:
        if service.name == "mockb":
            raise RuntimeError("injected: cannot build mockb")
        return build_cluster(service, port, policy)

    async def failure_shown() -> list[dict[str, str]]:
        return list((await _ready(plane))[1].get("build_errors", []))

    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        await c.request(typeurls.CLUSTER)
        first = await c.recv()
        await c.ack(first)
        assert sorted(ads_client.resources(first)) == [MOCKB, MOCKC]

        monkeypatch.setattr(translate, "build_cluster", broken)
        with structlog.testing.capture_logs() as logs:
            write_yaml(endpoints, _doc(mockb_port=9000))  # mockb's cluster must be rebuilt: that fails
            [shown] = await wait_for(failure_shown, what="the failure shown in /ready's body")
            assert shown["service"] == "default/mockb" and shown["type"] == "cds" and "injected" in shown["error"]
            assert (await _ready(plane))[0] == 200
            # The push loop lives on: a change of another service is pushed, while mockb changes and fails again.
            write_yaml(endpoints, _doc(mockb_port=9000, mockb_target=9101, mockd=True))
            update = await c.recv()
            await c.ack(update)
            await wait_for(lambda: _errors_counted(plane) >= 2, what="each failure counted")
        assert sorted(ads_client.resources(update)) == [MOCKB, MOCKC, MOCKD]
        kept = ads_client.resources(update)[MOCKB]
        assert kept == ads_client.resources(first)[MOCKB], "mockb is left on its last good cluster"
        failures = [e for e in logs if e["event"].startswith("build failed")]
        assert len(failures) == 1, failures  # logged once, not once per change
        assert failures[0]["service"] == "default/mockb" and "injected" in failures[0]["error"]

        monkeypatch.setattr(translate, "build_cluster", build_cluster)  # the bug fixed: mockb builds again
        write_yaml(endpoints, _doc(mockb_port=9000))
        while set(ads_client.resources(update)) != {MOCKB_9000, MOCKC}:  # make before break: the old cluster goes last
            update = await c.recv()
            await c.ack(update)
        assert await failure_shown() == []
