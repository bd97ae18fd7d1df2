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
from tests import pki

pytestmark = [pytest.mark.envoy, pytest.mark.any_protocol]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "envoy"


def materialize(name: str, directory: Path, ca: pki.CA, spiffe_id: str) -> Path:
    """The shipped bootstrap with its mounted files made real under `directory`: the SDS documents of
    deploy/envoy/sds/ and a client certificate (tls.crt, tls.key, ca.crt, as a Kubernetes TLS secret)."""
    sds, certs = directory / "sds", directory / "certs"
    sds.mkdir(parents=True, exist_ok=True)
    cert, key, _ = ca.issue("client", uris=(spiffe_id,))
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "tls.crt").write_bytes(cert)
    (certs / "tls.key").write_bytes(key)
    (certs / "ca.crt").write_bytes(ca.pem)

    def moved(text: str) -> str:
        return text.replace("/etc/envoy/sds", str(sds)).replace("/etc/meshplane/certs", str(certs))

    for doc in (DEPLOY / "sds").glob("*.yaml"):
        (sds / doc.name).write_text(moved(doc.read_text()))
    out = directory / name
    out.write_text(moved((DEPLOY / name).read_text()))
    return out


@pytest.mark.parametrize("name", ["sidecar.yaml", "gateway.yaml", "compose-sidecar.yaml"])
async def test_envoy_accepts_the_shipped_bootstrap(name: str, tmp_path: Path) -> None:
    path = materialize(name, tmp_path, pki.CA(), "spiffe://cluster.local/ns/default/sa/mocka")
    run = await asyncio.create_subprocess_exec(
        str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, out.decode()[-2000:]


@pytest.mark.parametrize(("name", "kind"), [("sidecar.yaml", proxy.Kind.SIDECAR), ("gateway.yaml", proxy.Kind.GATEWAY)])
def test_the_shipped_node_classifies(name: str, kind: proxy.Kind) -> None:
    node = json_format.ParseDict(yaml.safe_load((DEPLOY / name).read_text())["node"], base_pb2.Node())
    classified = proxy.classify(node)
    assert classified.kind == kind
    assert classified.locality.cluster  # sub_zone: the proxy's own cluster, for failover
