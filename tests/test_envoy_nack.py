"""A config real Envoy rejects is counted as a NACK, logged, and not re-sent in a loop."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from meshplane.demo import envoy
from tests.conftest import cluster_doc, wait_for, write_yaml

pytestmark = pytest.mark.envoy


def _nacks(plane: Any, short: str) -> float:
    return plane.metrics.registry.get_sample_value("meshplane_xds_nacks_total", {"type": short}) or 0.0


def _responses(plane: Any, short: str) -> float:
    return plane.metrics.registry.get_sample_value("meshplane_xds_responses_total", {"type": short}) or 0.0


async def test_listener_envoy_cannot_bind_is_nacked_once(start_plane: Any, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    plane = await start_plane(endpoint_files=(path,))
    with socket.socket() as taken:  # the port the listener asks for is already bound
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = envoy.EnvoyNode(
            id="sidecar-nack", cluster="test", region="r1", zone="z1", sub_zone="c1",
            metadata={"listener_port": port, "listener_address": "127.0.0.1"},
        )
        async with envoy.EnvoyProcess(node=node, ads_port=plane.ads_port, workdir=tmp_path) as proxy:
            await wait_for(lambda: _nacks(plane, "lds") >= 1, what="Envoy's LDS NACK counted")
            stats = await proxy.stats()
            assert stats["listener_manager.lds.update_rejected"] >= 1
            sent = _responses(plane, "lds")
            # No resend loop: the same rejected listener is not pushed again while nothing changes.
            await wait_for(lambda: _responses(plane, "cds") >= 1, what="CDS served")
            write_yaml(path, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9010}]}))
            await wait_for(lambda: _responses(plane, "eds") >= 2, what="the endpoint change pushed")
            assert _responses(plane, "lds") == sent
            assert _nacks(plane, "lds") == 1
            # Clusters and endpoints were accepted all the same.
            assert (await proxy.stats())["cluster_manager.cds.update_rejected"] == 0
