"""The Envoy bootstraps shipped in deploy/envoy/ are ones Envoy accepts (`envoy --mode validate`), and
their node says what meshplane's classification needs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshplane.demo.envoy import envoy_binary
from meshplane.xds import proxy

pytestmark = [pytest.mark.envoy, pytest.mark.any_protocol]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "envoy"


@pytest.mark.parametrize("name", ["sidecar.yaml", "gateway.yaml", "compose-sidecar.yaml"])
async def test_envoy_accepts_the_shipped_bootstrap(name: str) -> None:
    run = await asyncio.create_subprocess_exec(
        str(envoy_binary()), "--mode", "validate", "-c", str(DEPLOY / name), "--disable-hot-restart",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, out.decode()[-2000:]


@pytest.mark.parametrize(("name", "kind"), [("sidecar.yaml", proxy.Kind.SIDECAR), ("gateway.yaml", proxy.Kind.GATEWAY)])
def test_the_shipped_node_classifies(name: str, kind: proxy.Kind) -> None:
    node = json_format.ParseDict(yaml.safe_load((DEPLOY / name).read_text())["node"], base_pb2.Node())
    classified = proxy.classify(node)
    assert classified.kind == kind
    assert classified.locality.cluster  # sub_zone: the proxy's own cluster, for failover
