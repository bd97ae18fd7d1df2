"""The command line as an operator meets it: validate, and serve's start-up errors and readiness."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from meshplane.demo import backend, topology
from meshplane.demo.ports import free_port
from tests.conftest import cluster_doc, wait_for, write_yaml


def _meshplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshplane", *args], capture_output=True, text=True, timeout=60)


def test_validate_ok(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(topology.s1_policy())
    result = _meshplane("validate", str(policy))
    assert result.returncode == 0, result.stderr
    assert f"{policy}: ok" in result.stdout


def test_validate_reports_file_line_field_reason(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: meshplane.io/v1\n"
        "services:\n"
        "  - name: reviews\n"
        "    locality:\n"
        "      failover:\n"
        "        - from: cn-hangzhou\n"
        "          to: cn-hangzhou\n"
    )
    result = _meshplane("validate", str(policy))
    assert result.returncode == 1
    assert f"{policy}:7: services[0].locality.failover[0].to: " in result.stderr, result.stderr
    assert "to itself" in result.stderr
    assert "policy rejected" in result.stderr


async def test_serve_refuses_a_broken_endpoint_file(tmp_path: Path) -> None:
    broken = tmp_path / "c1.yaml"
    broken.write_text("cluster: c1\nregion: r1\nservices:\n  - name: svc\n    ports: [{name: http, port: 80}]\n"
                      "    endpoints:\n      - {address: 10.0.0.1, zone: z1, health: sick}\n")
    result = _meshplane("serve", "--endpoints", str(broken), "--ads", "127.0.0.1:0", "--http", "127.0.0.1:0")
    assert result.returncode == 1
    assert f"{broken}:7: services[0].endpoints[0].health: 'sick'" in result.stderr, result.stderr


async def test_serve_becomes_ready_and_stops_on_sigint(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    http_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", "serve", "--endpoints", str(path),
        "--ads", "127.0.0.1:0", "--http", f"127.0.0.1:{http_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async def ready() -> dict[str, object] | None:
            try:
                status, body = await backend.http_get(http_port, "localhost", "/ready")
            except OSError:
                return None
            return json.loads(body) if status == 200 else None

        state = await wait_for(ready, timeout=20, what="/ready answering 200")
        assert state["clusters"] == {"c1": {"synced": True, "stale": False, "error": ""}}
        status, metrics = await backend.http_get(http_port, "localhost", "/metrics")
        assert status == 200 and 'meshplane_discovery_cluster_synced{cluster="c1"} 1.0' in metrics
    finally:
        proc.send_signal(2)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
